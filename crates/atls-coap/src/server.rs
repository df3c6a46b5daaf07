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
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use crate::app;
use crate::block::{
    block1_step, block2_slice, block_error, etag, Block1Assembly, Block1Step, BlockError, BlockValue,
    BLOCK1_LIFETIME, MAX_BLOCK1_TRANSFERS,
};
use crate::echo::EchoGuard;
pub use crate::echo::AMPLIFICATION_FACTOR;
pub(crate) use crate::message::random;
use crate::message::{answer, diagnostic, is_atls_path, parse_request, read_uint};
pub use crate::message::{random_bytes, uint_option};

/// Content-Format of `application/atls`: IANA has assigned none (draft §12),
/// so a value from the experimental range (RFC 7252 §12.3), configurable.
pub const CONTENT_FORMAT_ATLS: u16 = 65000;

/// Content-Format of `application/multipart-core` (RFC 8710).
pub const CONTENT_FORMAT_MULTIPART_CORE: u64 = 62;

/// Settings of a [`CoapServer`].
#[derive(Clone, Debug)]
pub struct CoapConfig {
    /// Content-Format number of ATLS payloads.
    pub content_format: u16,
    /// Block size of this server's Block2 answers (16..=1024, a power of
    /// two). Block1 blocks of any size up to 1024 are accepted.
    pub block_size: usize,
    /// The session table's bounds.
    pub policy: Policy,
    /// Largest handshake flight reassembled from Block1 blocks.
    pub max_flight: usize,
    /// Validated client endpoints remembered (handshakes, blockwise
    /// transfers, deduplication); the least recently seen is forgotten
    /// beyond it.
    pub max_endpoints: usize,
    /// Endpoints remembered per IP address. A gateway that gives each
    /// device its own source port (draft §5.1.5) needs one per device.
    pub max_endpoints_per_ip: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            content_format: CONTENT_FORMAT_ATLS,
            block_size: 512,
            policy: Policy::default(),
            max_flight: 64 * 1024,
            max_endpoints: 20_000,
            max_endpoints_per_ip: 1024,
        }
    }
}

/// Answers remembered per endpoint for deduplication (RFC 7252 §4.5).
const RECENT_PER_ENDPOINT: usize = 4;
/// Message IDs remembered per endpoint beyond those answers: a late
/// duplicate of one is dropped rather than run again.
const MIDS_PER_ENDPOINT: usize = 64;
/// How long a message ID is remembered (EXCHANGE_LIFETIME, RFC 7252 §4.8.2).
const DEDUP_LIFETIME: Duration = Duration::from_secs(247);
/// CoAP messages one records-mode POST may carry.
const MAX_RECORDS_MESSAGES: usize = 16;

/// The transport a CoAP message arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// CoAP over UDP (RFC 7252): endpoints are validated with Echo.
    Udp,
    /// CoAP over TCP (RFC 8323): reliable, validated by the TCP handshake.
    Tcp,
    /// CoAP over DTLS (RFC 7252 §9, `coaps://`): validated by the DTLS
    /// handshake, messages deduplicated as over UDP.
    Dtls,
}

impl Transport {
    /// Whether the transport delivers messages reliably and in order.
    pub fn is_reliable(self) -> bool {
        self == Self::Tcp
    }

    /// The URI scheme of the transport, for logs and metrics.
    pub fn scheme(self) -> &'static str {
        match self {
            Self::Udp => "coap",
            Self::Tcp => "coap+tcp",
            Self::Dtls => "coaps",
        }
    }
}

/// A client endpoint: its address and port, and the transport (a TCP
/// connection and a UDP socket of the same address and port are different
/// endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Address and port.
    pub addr: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

/// What the server knows of one *validated* client endpoint (an endpoint
/// that returned an Echo value, or reached the server over TCP). Nothing is
/// kept for any other.
struct Peer {
    half_open: Option<SessionId>,
    established: Option<SessionId>,
    block1: Option<(Block1Assembly, Instant)>,
    /// The last answer too large for one message, served in Block2 blocks
    /// until its last block is fetched.
    block2: Option<(Vec<u8>, [u8; 8])>,
    /// (message ID, answer) of recent confirmable requests.
    recent: VecDeque<(u16, Instant, Vec<u8>)>,
    /// Message IDs of older confirmable requests.
    mids: VecDeque<(u16, Instant)>,
    seen: Instant,
    /// Blockwise inside OSCORE (RFC 8613 §4.1.3.4.2: Block options are
    /// inner): a request body arriving, and the last large response.
    inner_block1: Option<(Block1Assembly, Instant)>,
    inner_block2: Option<(coap_lite::MessageClass, Vec<u8>)>,
    /// The session the inner transfers belong to: one endpoint may run
    /// several sessions, and a transfer never crosses from one to another.
    inner_owner: Option<SessionId>,
    /// DTLS as the ATLS layer: this server's last handshake flight. A
    /// client whose DTLS timer fired sends its flight again (new record
    /// numbers, the same handshake messages); the stack takes nothing new
    /// from it, and the client gets this flight again, as a DTLS peer
    /// retransmits its last flight when it sees the peer's again (RFC 6347
    /// §4.2.4). Dropped once the client sends protected requests.
    dtls_last: Option<Vec<u8>>,
}

impl Peer {
    fn new(now: Instant) -> Self {
        Self {
            half_open: None,
            established: None,
            block1: None,
            block2: None,
            recent: VecDeque::new(),
            mids: VecDeque::new(),
            seen: now,
            inner_block1: None,
            inner_block2: None,
            inner_owner: None,
            dtls_last: None,
        }
    }

    fn transfers(&self) -> usize {
        usize::from(self.block1.is_some()) + usize::from(self.inner_block1.is_some())
    }
}

/// The validated endpoints, least recently seen first, with a cap per IP
/// address (so one host cannot push out everyone's state) and the count of
/// Block1 transfers in progress. Every operation is O(log n).
#[derive(Default)]
struct Peers {
    map: HashMap<Endpoint, Peer>,
    order: BTreeSet<(Instant, Endpoint)>,
    per_ip: HashMap<std::net::IpAddr, usize>,
    transfers: usize,
}

/// Why an endpoint cannot be remembered.
struct NoRoom;

impl Peers {
    fn remove(&mut self, endpoint: &Endpoint) {
        if let Some(peer) = self.map.remove(endpoint) {
            self.order.remove(&(peer.seen, *endpoint));
            self.transfers = self.transfers.saturating_sub(peer.transfers());
            if let Some(n) = self.per_ip.get_mut(&endpoint.addr.ip()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_ip.remove(&endpoint.addr.ip());
                }
            }
        }
    }

    /// Run `f` on the endpoint's state, creating it (the endpoint is
    /// validated) when there is room.
    fn with<R>(
        &mut self,
        from: Endpoint,
        now: Instant,
        config: &CoapConfig,
        f: impl FnOnce(&mut Peer, &mut usize) -> R,
    ) -> Result<R, NoRoom> {
        if !self.map.contains_key(&from) {
            if self.per_ip.get(&from.addr.ip()).copied().unwrap_or(0) >= config.max_endpoints_per_ip.max(1) {
                return Err(NoRoom);
            }
            if self.map.len() >= config.max_endpoints.max(1) {
                if let Some((_, oldest)) = self.order.first().copied() {
                    self.remove(&oldest);
                }
            }
            self.map.insert(from, Peer::new(now));
            self.order.insert((now, from));
            *self.per_ip.entry(from.addr.ip()).or_insert(0) += 1;
        }
        if self.transfers >= MAX_BLOCK1_TRANSFERS {
            self.expire_transfers(now);
        }
        let Some(peer) = self.map.get_mut(&from) else {
            return Err(NoRoom);
        };
        let before = peer.seen;
        peer.seen = peer.seen.max(now);
        let transfers_before = peer.transfers();
        let result = f(peer, &mut self.transfers);
        let (seen, transfers_after) = (peer.seen, peer.transfers());
        self.transfers = self
            .transfers
            .saturating_add(transfers_after)
            .saturating_sub(transfers_before);
        if seen != before {
            self.order.remove(&(before, from));
            self.order.insert((seen, from));
        }
        Ok(result)
    }

    /// Drop Block1 transfers idle for `BLOCK1_LIFETIME`, looking at the
    /// endpoints seen least recently (where idle transfers are), a bounded
    /// number per call.
    fn expire_transfers(&mut self, now: Instant) {
        let stale: Vec<Endpoint> = self
            .order
            .iter()
            .take(64)
            .take_while(|(seen, _)| now.saturating_duration_since(*seen) > BLOCK1_LIFETIME)
            .map(|(_, e)| *e)
            .collect();
        for endpoint in stale {
            if let Some(peer) = self.map.get_mut(&endpoint) {
                let before = peer.transfers();
                peer.block1 = None;
                peer.inner_block1 = None;
                self.transfers = self.transfers.saturating_sub(before);
            }
        }
    }

    fn contains(&self, endpoint: &Endpoint) -> bool {
        self.map.contains_key(endpoint)
    }
}

type Entry = Mutex<ServerSession>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The ATLS-over-CoAP server core.
pub struct CoapServer {
    endpoint: Arc<dyn ServerEndpoint>,
    /// DTLS 1.2 as the ATLS layer (layered TLS over an unreliable link):
    /// flights in DTLS framing go to this endpoint.
    dtls: Option<Arc<dyn ServerEndpoint>>,
    config: CoapConfig,
    table: SessionTable<Entry>,
    peers: Mutex<Peers>,
    /// Stateless Echo address validation.
    echo: EchoGuard,
}

impl fmt::Debug for CoapServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoapServer")
            .field("engine", &self.endpoint.engine_name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CoapServer {
    /// A server on `endpoint` with `config`.
    pub fn new(endpoint: Arc<dyn ServerEndpoint>, config: CoapConfig) -> Arc<Self> {
        Self::with_dtls(endpoint, None, config)
    }

    /// A server whose ATLS layer is TLS on `endpoint` and, for flights in
    /// DTLS framing (known from the first record), DTLS 1.2 on `dtls`.
    pub fn with_dtls(
        endpoint: Arc<dyn ServerEndpoint>,
        dtls: Option<Arc<dyn ServerEndpoint>>,
        config: CoapConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            table: SessionTable::new(config.policy),
            endpoint,
            dtls,
            config,
            peers: Mutex::new(Peers::default()),
            echo: EchoGuard::new(),
        })
    }

    /// Forget the exchanges of `addr` on `transport` — deduplication,
    /// blockwise transfers, the last handshake answer — but not its ATLS
    /// sessions: a new DTLS session of the transport scopes message IDs
    /// afresh (RFC 7252 §9.1).
    pub fn reset_exchanges(&self, addr: SocketAddr, transport: Transport) {
        let endpoint = Endpoint { addr, transport };
        let mut peers = lock(&self.peers);
        let dropped = peers.map.get_mut(&endpoint).map(|peer| {
            let before = peer.transfers();
            peer.recent.clear();
            peer.mids.clear();
            peer.block1 = None;
            peer.block2 = None;
            peer.inner_block1 = None;
            peer.inner_block2 = None;
            peer.inner_owner = None;
            peer.dtls_last = None;
            before
        });
        if let Some(before) = dropped {
            peers.transfers = peers.transfers.saturating_sub(before);
        }
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
        let request = match parse_request(datagram)? {
            Ok(request) => request,
            Err(pong) => return Some(pong),
        };
        let from = Endpoint {
            addr: from,
            transport: Transport::Udp,
        };
        self.handle_datagram(datagram, request, from, now)
    }

    /// Handle one CoAP message that arrived inside the DTLS session of
    /// `from` (CoAP over DTLS): the DTLS handshake validated the endpoint.
    pub fn handle_secured(&self, message: &[u8], from: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let request = match parse_request(message)? {
            Ok(request) => request,
            Err(pong) => return Some(pong),
        };
        let from = Endpoint {
            addr: from,
            transport: Transport::Dtls,
        };
        self.handle_datagram(message, request, from, now)
    }

    fn handle_datagram(
        &self,
        datagram: &[u8],
        request: Packet,
        from: Endpoint,
        now: Instant,
    ) -> Option<Vec<u8>> {
        // Address validation (draft §7; RFC 9175 §2.4): nothing is kept for,
        // and at most three times its bytes are sent to, an endpoint that
        // has not shown it receives what is sent to it. Its requests get a
        // 4.01 with an Echo value computed from its address and the time
        // (so the challenge needs no state, as DTLS's HelloVerifyRequest);
        // the endpoint is validated when it repeats a request with it.
        if from.transport == Transport::Udp && !lock(&self.peers).contains(&from) {
            if let Err(challenge) = self.echo.check(&request, datagram.len(), from.addr, now) {
                return challenge;
            }
        }
        // Deduplication (RFC 7252 §4.5) of confirmable and non-confirmable
        // messages alike: a duplicate gets the same answer (or none), and
        // never reaches the TLS stack twice.
        let mid = request.header.message_id;
        let seen = self.with_peer(from, now, |peer, _| {
            let fresh = |at: &Instant| now.duration_since(*at) < DEDUP_LIFETIME;
            if let Some((_, _, cached)) = peer.recent.iter().find(|(m, at, _)| *m == mid && fresh(at)) {
                // A retransmission: the same answer, the TLS stack untouched.
                return Ok(Some(cached.clone()));
            }
            if peer.mids.iter().any(|(m, at)| *m == mid && fresh(at)) {
                // A late duplicate of an older request: already answered.
                return Err(());
            }
            Ok(None)
        });
        match seen {
            Err(NoRoom) => {
                let p = diagnostic(
                    &request,
                    ResponseType::ServiceUnavailable,
                    "too many endpoints from this address",
                );
                return p.to_bytes().ok();
            }
            Ok(Err(())) => return None,
            Ok(Ok(Some(cached))) => return Some(cached),
            Ok(Ok(None)) => {}
        }
        let response = self.respond(&request, from, now, self.config.block_size);
        let bytes = response.to_bytes_unlimited().ok()?;
        {
            let _ = self.with_peer(from, now, |peer, _| {
                peer.recent.push_back((mid, now, bytes.clone()));
                while peer.recent.len() > RECENT_PER_ENDPOINT {
                    if let Some((old, at, _)) = peer.recent.pop_front() {
                        peer.mids.push_back((old, at));
                    }
                }
                while peer.mids.len() > MIDS_PER_ENDPOINT {
                    peer.mids.pop_front();
                }
            });
        }
        Some(bytes)
    }

    /// Handle one request from a reliable transport (CoAP over TCP, RFC
    /// 8323): no deduplication, and the endpoint needs no validation (the
    /// TCP handshake did it).
    pub fn handle_reliable(&self, request: &Packet, from: SocketAddr, now: Instant) -> Option<Packet> {
        if !matches!(request.header.code, MessageClass::Request(_)) {
            return None;
        }
        let from = Endpoint {
            addr: from,
            transport: Transport::Tcp,
        };
        if self.with_peer(from, now, |_, _| ()).is_err() {
            return Some(diagnostic(
                request,
                ResponseType::ServiceUnavailable,
                "too many endpoints from this address",
            ));
        }
        // A reliable transport carries whole messages (up to the size both
        // sides announced): no Block2 for answers.
        Some(self.respond(request, from, now, crate::tcp::MAX_MESSAGE_SIZE))
    }

    /// `whole`: the largest answer payload sent without Block2. One `info`
    /// event per request (target `atls::access`): what the server saw
    /// outside ATLS.
    fn respond(&self, request: &Packet, from: Endpoint, now: Instant, whole: usize) -> Packet {
        let start = Instant::now();
        let answer = self.respond_unlogged(request, from, now, whole);
        let mode = if is_atls_path(request) {
            "atls"
        } else if request.get_option(CoapOption::Oscore).is_some() {
            "oscore"
        } else {
            "-"
        };
        let elapsed = start.elapsed();
        // One line and one count per exchange: the blocks inside a
        // blockwise transfer (a Block1 block with more to come, a Block2
        // follow-up) are debug events, so that small blocks cannot
        // multiply the log.
        let block = |option| {
            request
                .get_first_option(option)
                .and_then(|v| crate::block::BlockValue::decode(v).ok())
        };
        // (An error answer ends the exchange: it is logged and counted.)
        let error = u8::from(answer.header.code) >> 5 >= 4;
        let inside_transfer = !error
            && (block(CoapOption::Block1).is_some_and(|b| b.more)
                || block(CoapOption::Block2).is_some_and(|b| b.num > 0));
        let path = if mode == "atls" { "/.well-known/atls" } else { "-" };
        macro_rules! access {
            ($level:ident, $message:literal) => {
                tracing::$level!(
                    target: "atls::access",
                    transport = from.transport.scheme(),
                    peer = %from.addr,
                    code = %request.header.code,
                    path,
                    mode,
                    status = %answer.header.code,
                    request_bytes = request.payload.len(),
                    response_bytes = answer.payload.len(),
                    duration_us = elapsed.as_micros() as u64,
                    $message
                )
            };
        }
        if inside_transfer {
            access!(debug, "block");
            return answer;
        }
        metrics::counter!(
            "atls_requests_total",
            "mode" => mode,
            "status" => answer.header.code.to_string(),
            "transport" => "coap"
        )
        .increment(1);
        metrics::histogram!("atls_request_duration_seconds", "mode" => mode, "transport" => "coap")
            .record(elapsed.as_secs_f64());
        access!(info, "request");
        answer
    }

    fn respond_unlogged(&self, request: &Packet, from: Endpoint, now: Instant, whole: usize) -> Packet {
        if let Some(option) = crate::message::unknown_critical(request) {
            return diagnostic(
                request,
                ResponseType::BadOption,
                &format!("unknown critical option {option}"),
            );
        }
        if request.get_option(CoapOption::ProxyUri).is_some()
            || request.get_option(CoapOption::ProxyScheme).is_some()
        {
            return diagnostic(
                request,
                ResponseType::ProxyingNotSupported,
                "this server is not a proxy",
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

    /// Run `f` on a validated endpoint's state (created when there is room).
    fn with_peer<R>(
        &self,
        from: Endpoint,
        now: Instant,
        f: impl FnOnce(&mut Peer, &mut usize) -> R,
    ) -> Result<R, NoRoom> {
        let mut peers = lock(&self.peers);
        peers.with(from, now, &self.config, f)
    }

    fn handle_flight(&self, request: &Packet, from: Endpoint, now: Instant, whole: usize) -> Packet {
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
                let szx = block2.szx.min(self.szx());
                let answer = self.with_peer(from, now, |peer, _| {
                    let (body, tag) = peer.block2.as_ref()?;
                    let p = self.block2_answer(request, body, *tag, block2.num, szx);
                    let last = block2_slice(body, block2.num, szx).is_some_and(|(_, v)| !v.more);
                    if last {
                        // The whole answer was fetched: nothing more to keep.
                        peer.block2 = None;
                    }
                    Some(p)
                });
                return match answer {
                    Ok(Some(p)) => p,
                    _ => block_error(request, BlockError::Incomplete),
                };
            }
        }
        let multipart = format == Some(CONTENT_FORMAT_MULTIPART_CORE);
        if format != Some(u64::from(self.config.content_format)) && !multipart {
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
                let (block1, step) = match self.block1(request, value, from, now, false) {
                    Ok(decoded) => decoded,
                    Err(e) => return block_error(request, e),
                };
                match step {
                    Block1Step::Continue => {
                        let mut p = answer(request, ResponseType::Continue);
                        p.add_option(CoapOption::Block1, block1.encode());
                        return p;
                    }
                    Block1Step::Complete(body) => body,
                }
            }
        };
        // RFC 8710 (draft §7): a multipart-core payload carries the flight
        // as its application/atls parts, concatenated in order.
        let flight = if multipart {
            match crate::multipart::atls_parts(&flight, self.config.content_format) {
                Ok(parts) => parts,
                Err(e) => return diagnostic(request, ResponseType::BadRequest, e),
            }
        } else {
            flight
        };
        let output = match self.flight(&flight, from, now) {
            Ok(output) => output,
            Err(reply) => return reply.into_packet(request, self.config.content_format),
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
        from: Endpoint,
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
        let tag = etag(&body);
        let p = self.block2_answer(request, &body, tag, 0, self.szx());
        let _ = self.with_peer(from, now, |peer, _| peer.block2 = Some((body, tag)));
        p
    }

    fn block2_answer(&self, request: &Packet, body: &[u8], tag: [u8; 8], num: u32, szx: u8) -> Packet {
        let Some((slice, value)) = block2_slice(body, num, szx) else {
            return block_error(request, BlockError::Incomplete);
        };
        let mut p = answer(request, ResponseType::Changed);
        p.add_option(
            CoapOption::ContentFormat,
            uint_option(u64::from(self.config.content_format)),
        );
        p.add_option(CoapOption::Block2, value.encode());
        // RFC 7959 §2.4: the ETag names the body the blocks come from, so a
        // client can tell when the answer changed between two blocks.
        p.add_option(CoapOption::ETag, tag.to_vec());
        if num == 0 {
            p.add_option(CoapOption::Size2, uint_option(body.len() as u64));
        }
        p.payload = slice.to_vec();
        p
    }

    /// Run one whole flight: a ClientHello opens a session for the endpoint,
    /// anything else continues the endpoint's session.
    fn flight(&self, flight: &[u8], from: Endpoint, now: Instant) -> Result<Vec<u8>, Reply> {
        let framing = atls_core::records::detect_framing(flight).unwrap_or(Framing::Tls);
        if framing == Framing::Dtls {
            let half_open_before = self.with_peer(from, now, |p, _| p.half_open).ok().flatten();
            let output = self.flight_once(flight, framing, from, now)?;
            let handshake = records::split_records(framing, flight).is_ok_and(|records| {
                records.iter().any(|r| {
                    matches!(
                        r.content_type,
                        records::ContentType::Handshake | records::ContentType::ChangeCipherSpec
                    )
                })
            });
            if !handshake {
                return Ok(output);
            }
            return Ok(self
                .with_peer(from, now, |p, _| {
                    let completed = half_open_before.is_some()
                        && p.half_open.is_none()
                        && p.established == half_open_before;
                    if output.is_empty() && completed {
                        // This flight completed the handshake (the client's
                        // last flight of an abbreviated one): nothing to send.
                        p.dtls_last = None;
                        Vec::new()
                    } else if output.is_empty() {
                        // The stack took nothing new from this flight: the
                        // client's timer fired because our last flight was
                        // lost. Send it again.
                        p.dtls_last.clone().unwrap_or_default()
                    } else {
                        p.dtls_last = Some(output.clone());
                        output.clone()
                    }
                })
                .unwrap_or(output));
        }
        self.flight_once(flight, framing, from, now)
    }

    fn flight_once(
        &self,
        flight: &[u8],
        framing: Framing,
        from: Endpoint,
        now: Instant,
    ) -> Result<Vec<u8>, Reply> {
        let first = records::classify_payload(framing, flight).map_err(|_| {
            Reply::new(
                ResponseType::BadRequest,
                "the payload is not a sequence of TLS records",
            )
        })?;
        let (half_open, established) = self
            .with_peer(from, now, |p, _| (p.half_open, p.established))
            .unwrap_or((None, None));
        let continuing = half_open
            .and_then(|id| self.table.get(&id, now))
            .or_else(|| established.and_then(|id| self.table.get(&id, now)));
        match (continuing, first) {
            // A ClientHello for a handshake in progress: its second
            // ClientHello after a HelloRetryRequest continues it; one that
            // does not fit it (a client that started over from the same
            // port) opens a new session; a late duplicate of a flight
            // already taken is refused and changes nothing.
            (Some(found), FirstFlight::ClientHello) if found.phase == Phase::HalfOpen => {
                if framing == Framing::Tls && lock(&found.entry).repeats_previous_payload(flight) {
                    return Err(Reply::new(
                        ResponseType::BadRequest,
                        "a duplicate of a flight already taken",
                    ));
                }
                match self.continue_flight(found, flight, from, now) {
                    Ok(output) => Ok(output),
                    Err(_) => self.open(flight, from, now),
                }
            }
            (Some(found), _) if found.phase == Phase::HalfOpen => {
                if framing == Framing::Tls && lock(&found.entry).repeats_previous_payload(flight) {
                    return Err(Reply::new(
                        ResponseType::BadRequest,
                        "a duplicate of a flight already taken",
                    ));
                }
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

    fn open(&self, flight: &[u8], from: Endpoint, now: Instant) -> Result<Vec<u8>, Reply> {
        let client = ClientKey::from(from.addr.ip());
        let admission = self.table.admit(Some(client), flight, now).map_err(|r| {
            tracing::info!(target: "atls::handshake", transport = from.transport.scheme(), %client, reason = r.reason(), "ATLS handshake refused");
            metrics::counter!("atls_handshakes_total", "outcome" => "refused", "reason" => r.reason(), "transport" => "coap").increment(1);
            Reply::refused(&r)
        })?;
        let id = admission.id();
        let endpoint = match records::detect_framing(flight) {
            Some(Framing::Dtls) => self.dtls.as_deref().ok_or(Reply::new(
                ResponseType::BadRequest,
                "this server does not run DTLS",
            ))?,
            _ => self.endpoint.as_ref(),
        };
        let mut session = ServerSession::accept(endpoint, &admission, self.limits(), 64 * 1024)
            .map_err(|_| Reply::new(ResponseType::InternalServerError, "cannot start an ATLS session"))?;
        session.repeats_previous_payload(flight);
        let progress = session.push_flight(flight, now).map_err(|f| {
            handshake_failed(from, None, &f.error);
            Reply::failure(f.alert)
        })?;
        if progress.output.is_empty() && !progress.established {
            return Err(Reply::new(
                ResponseType::BadRequest,
                "the TLS stack did not answer this first flight",
            ));
        }
        admission
            .insert(Mutex::new(session))
            .map_err(|r| Reply::refused(&r))?;
        let _ = self.with_peer(from, now, |p, _| p.half_open = Some(id));
        if progress.established {
            self.complete(id, from, now)?;
        }
        Ok(progress.output)
    }

    fn continue_flight(
        &self,
        found: atls_sessions::Found<Entry>,
        flight: &[u8],
        from: Endpoint,
        now: Instant,
    ) -> Result<Vec<u8>, Reply> {
        if found.phase == Phase::Established {
            return self.records(found, flight, from, now);
        }
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
                    handshake_failed(from, Some(found.id), &failure.error);
                    self.table.remove(&found.id);
                    let _ = self.with_peer(from, now, |p, _| p.half_open = None);
                } else {
                    lock(&found.entry).abandon_records();
                }
                Err(Reply::failure(failure.alert))
            }
        }
    }

    /// Records on an established session: the last handshake flight again
    /// (answered by the TLS stack), or records mode — CoAP requests inside
    /// TLS records, framed as in RFC 8323 over TLS and one RFC 7252 message
    /// per record over DTLS, answered the same way inside the answer's
    /// records.
    fn records(
        &self,
        found: atls_sessions::Found<Entry>,
        flight: &[u8],
        from: Endpoint,
        now: Instant,
    ) -> Result<Vec<u8>, Reply> {
        let mut s = lock(&found.entry);
        if !s.records_open() {
            return Err(Reply::new(
                ResponseType::NotFound,
                "the records channel of this ATLS session ended; start with a ClientHello",
            ));
        }
        let framing = s.framing();
        // Over DTLS, record boundaries are message boundaries: push the
        // records one at a time.
        let pieces: Vec<&[u8]> = match framing {
            Framing::Tls => vec![flight],
            Framing::Dtls => records::split_records(framing, flight)
                .map_err(|_| Reply::new(ResponseType::BadRequest, "not a sequence of DTLS records"))?
                .iter()
                .map(|r| r.bytes)
                .collect(),
        };
        let mut output = Vec::new();
        let mut messages: Vec<Vec<u8>> = Vec::new();
        let mut stream = Vec::new();
        for piece in pieces {
            match s.push_flight(piece, now) {
                Ok(progress) => {
                    output.extend_from_slice(&progress.output);
                    if progress.application_data.is_empty() {
                        continue;
                    }
                    match framing {
                        Framing::Tls => stream.extend_from_slice(&progress.application_data),
                        Framing::Dtls => messages.push(progress.application_data),
                    }
                }
                Err(failure) => {
                    s.abandon_records();
                    return Err(Reply::failure(failure.alert));
                }
            }
        }
        if framing == Framing::Tls {
            // RFC 8323 frames: a POST carries whole messages.
            let mut rest = stream.as_slice();
            while !rest.is_empty() {
                let len = crate::tcp::frame_len(rest).filter(|n| *n <= rest.len());
                let Some(len) = len else {
                    s.abandon_records();
                    return Err(Reply::new(
                        ResponseType::BadRequest,
                        "records mode: a POST must carry whole CoAP messages",
                    ));
                };
                let (frame, tail) = rest.split_at(len);
                messages.push(frame.to_vec());
                rest = tail;
            }
        }
        if messages.len() > MAX_RECORDS_MESSAGES {
            // Each request's answer may be much larger than the request:
            // bound what one POST can make the server build and keep.
            s.abandon_records();
            return Err(Reply::new(
                ResponseType::RequestEntityTooLarge,
                "records mode: too many CoAP messages in one POST",
            ));
        }
        drop(s);
        if messages.is_empty() {
            return Ok(output);
        }
        self.table.touch(&found.id, now);
        let _ = self.with_peer(from, now, |p, _| p.dtls_last = None);
        // Inner blockwise as inside OSCORE: over DTLS a message must fit
        // one record, so larger bodies go in inner blocks.
        let whole = match framing {
            Framing::Tls => crate::tcp::MAX_MESSAGE_SIZE,
            Framing::Dtls => self.config.block_size,
        };
        let mut answers = Vec::with_capacity(messages.len());
        let mut total = 0usize;
        for message in messages {
            let answer = match framing {
                Framing::Tls => crate::tcp::decode(&message).ok().and_then(|(_, request)| {
                    let mut response = self.inner_exchange(&found, &request, from, now, whole, "records");
                    response.set_token(request.get_token().to_vec());
                    crate::tcp::encode(&response).ok()
                }),
                Framing::Dtls => crate::message::validate(&message)
                    .ok()
                    .and_then(|()| Packet::from_bytes(&message).ok())
                    .filter(|r| matches!(r.header.code, MessageClass::Request(_)))
                    .and_then(|request| {
                        let mut response = self.inner_exchange(&found, &request, from, now, whole, "records");
                        let template = answer(&request, ResponseType::Content);
                        response.header.set_type(template.header.get_type());
                        response.header.message_id = template.header.message_id;
                        response.set_token(request.get_token().to_vec());
                        response.to_bytes_unlimited().ok()
                    }),
            };
            total = total.saturating_add(answer.as_ref().map_or(0, Vec::len));
            answers.push(answer);
            if total > self.config.max_flight {
                // Stop at once: the rest is neither run nor answered.
                break;
            }
        }
        let mut s = lock(&found.entry);
        if total > self.config.max_flight {
            s.abandon_records();
            return Err(Reply::new(
                ResponseType::RequestEntityTooLarge,
                "records mode: the answers exceed the largest flight",
            ));
        }
        for answer in answers {
            let Some(answer) = answer else {
                s.abandon_records();
                return Err(Reply::new(
                    ResponseType::BadRequest,
                    "records mode: not a CoAP request",
                ));
            };
            match s.send(&answer, now) {
                Ok(records) => output.extend_from_slice(&records),
                // An OSCORE request of this session verified meanwhile and
                // released the engine.
                Err(atls_core::Error::Closed) => {
                    s.abandon_records();
                    return Err(Reply::new(
                        ResponseType::NotFound,
                        "the records channel of this ATLS session ended; start with a ClientHello",
                    ));
                }
                Err(_) => {
                    s.abandon_records();
                    return Err(Reply::new(
                        ResponseType::InternalServerError,
                        "cannot protect the answer",
                    ));
                }
            }
        }
        Ok(output)
    }

    fn complete(&self, id: SessionId, from: Endpoint, now: Instant) -> Result<(), Reply> {
        self.table.establish(&id, now).map_err(|r| {
            tracing::info!(target: "atls::handshake", transport = from.transport.scheme(), session = %id.prefix(), reason = r.reason(), "completed ATLS handshake refused");
            metrics::counter!("atls_handshakes_total", "outcome" => "refused", "reason" => r.reason(), "transport" => "coap").increment(1);
            Reply::refused(&r)
        })?;
        if let Some(found) = self.table.get(&id, now) {
            let s = lock(&found.entry);
            if let Some(info) = s.handshake_info() {
                tracing::info!(
                    target: "atls::handshake",
                    transport = from.transport.scheme(),
                    peer = %from.addr,
                    session = %id.prefix(),
                    version = info.version.name(),
                    suite = %info.cipher_suite,
                    engine = s.engine_name(),
                    resumed = info.resumed,
                    "ATLS handshake complete"
                );
                metrics::counter!(
                    "atls_handshakes_total",
                    "outcome" => "complete",
                    "version" => info.version.name(),
                    "engine" => s.engine_name(),
                    "transport" => "coap"
                )
                .increment(1);
            }
        }
        let _ = self.with_peer(from, now, |p, _| {
            p.half_open = None;
            p.established = Some(id);
            p.block2 = None;
        });
        Ok(())
    }

    fn handle_oscore(&self, request: &Packet, from: Endpoint, now: Instant, whole: usize) -> Packet {
        let kid = match atls_oscore::message::oscore_option(request) {
            Ok(option) => option.kid,
            Err(e) => return oscore_error(request, &e),
        };
        let by_kid = kid
            .filter(|k| !k.is_empty())
            .and_then(|k| self.table.get_by_kid(KidKind::Oscore, &k, now));
        let found = by_kid.or_else(|| {
            let established = self.with_peer(from, now, |p, _| p.established).ok().flatten();
            established.and_then(|id| self.table.get(&id, now))
        });
        let Some(found) = found.filter(|f| f.phase == Phase::Established) else {
            return oscore_error(request, &OscoreError::ContextNotFound);
        };
        let opened = {
            let mut s = lock(&found.entry);
            let opened = match s.established_mut() {
                Some(est) => atls_oscore::unprotect_request(&mut est.oscore, request),
                None => Err(OscoreError::ContextNotFound),
            };
            if opened.is_ok() {
                // The client uses the exported keys: the TLS engine has done its work.
                s.release_engine();
            }
            opened
        };
        let (inner, binding) = match opened {
            Ok(opened) => opened,
            Err(e) => return oscore_error(request, &e),
        };
        self.table.touch(&found.id, now);
        let _ = self.with_peer(from, now, |p, _| p.dtls_last = None);
        let closing = ends_session(&inner);
        let inner_response = if closing {
            let mut p = Packet::new();
            p.header.code = MessageClass::Response(ResponseType::Deleted);
            p
        } else {
            self.inner_exchange(&found, &inner, from, now, whole, "oscore")
        };
        let protected = {
            let mut s = lock(&found.entry);
            match s.established_mut() {
                Some(est) => atls_oscore::protect_response(&mut est.oscore, &inner_response, &binding, false),
                None => Err(OscoreError::ContextNotFound),
            }
        };
        if closing && protected.is_ok() {
            self.table.remove(&found.id);
            let _ = self.with_peer(from, now, |p, _| {
                if p.established == Some(found.id) {
                    p.established = None;
                }
                // Nothing of the ended session's inner transfers is kept.
                if p.inner_owner == Some(found.id) {
                    p.inner_block1 = None;
                    p.inner_block2 = None;
                    p.inner_owner = None;
                }
            });
            tracing::debug!(target: "atls::handshake", transport = from.transport.scheme(), session = %found.id.prefix(), "ATLS session ended by the client");
        }
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
    /// One Block1 block of `packet` (option value `value`) for the
    /// endpoint's outer (flight) or inner (OSCORE) transfer.
    fn block1(
        &self,
        packet: &Packet,
        value: &[u8],
        from: Endpoint,
        now: Instant,
        inner: bool,
    ) -> Result<(BlockValue, Block1Step), BlockError> {
        let block = BlockValue::decode(value)?;
        let size1 = packet
            .get_first_option(CoapOption::Size1)
            .and_then(|v| read_uint(v))
            .map(|s| usize::try_from(s).unwrap_or(usize::MAX));
        let max = self.config.max_flight;
        let step = self
            .with_peer(from, now, |peer, transfers| {
                let slot = if inner {
                    &mut peer.inner_block1
                } else {
                    &mut peer.block1
                };
                block1_step(slot, *transfers, block, &packet.payload, size1, max, now)
            })
            .unwrap_or(Err(BlockError::Busy))?;
        Ok((block, step))
    }

    /// The inner (decrypted) exchange, with blockwise transfer inside
    /// OSCORE: Block1 request bodies are reassembled (bounded like flights)
    /// and responses larger than a block go in Block2 blocks.
    fn inner_exchange(
        &self,
        found: &atls_sessions::Found<Entry>,
        inner: &Packet,
        from: Endpoint,
        now: Instant,
        whole: usize,
        mode: &str,
    ) -> Packet {
        let reply = |code: ResponseType| {
            let mut p = Packet::new();
            p.header.code = MessageClass::Response(code);
            p
        };
        // The endpoint's inner transfers are this session's, or are dropped:
        // another session of the same address never sees them.
        let _ = self.with_peer(from, now, |p, _| {
            if p.inner_owner != Some(found.id) {
                p.inner_block1 = None;
                p.inner_block2 = None;
                p.inner_owner = Some(found.id);
            }
        });
        if let Some(value) = inner.get_first_option(CoapOption::Block2) {
            let block = match BlockValue::decode(value) {
                Ok(b) => b,
                Err(_) => return reply(ResponseType::BadOption),
            };
            if block.num > 0 {
                let stored = self
                    .with_peer(from, now, |p, _| p.inner_block2.clone())
                    .ok()
                    .flatten();
                let Some((code, body)) = stored else {
                    return reply(ResponseType::RequestEntityIncomplete);
                };
                if block2_slice(&body, block.num, block.szx.min(self.szx())).is_some_and(|(_, v)| !v.more) {
                    let _ = self.with_peer(from, now, |p, _| p.inner_block2 = None);
                }
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
            let step = match self.block1(inner, value, from, now, true) {
                Ok((_, step)) => Ok(step),
                Err(e) => Err(e),
            };
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
                Err(BlockError::Busy) => return reply(ResponseType::ServiceUnavailable),
            }
        }
        let (info, engine) = {
            let s = lock(&found.entry);
            (s.established().map(|e| e.info.clone()), s.engine_name())
        };
        let mut response = app::builtin_in_mode(&request, info.as_ref(), engine, mode);
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
            let _ = self.with_peer(from, now, |p, _| p.inner_block2 = Some((code, body)));
        }
        response
    }
}

/// Whether a verified inner request ends its session (PROTOCOL.md §12: a
/// protected `DELETE /.well-known/atls`, whole: no Block1 transfer and no
/// Block2 follow-up; a Block2 of block 0 only proposes a block size).
fn ends_session(inner: &Packet) -> bool {
    let follow_up = inner
        .get_first_option(CoapOption::Block2)
        .is_some_and(|value| BlockValue::decode(value).map_or(true, |b| b.num > 0));
    if inner.header.code != MessageClass::Request(RequestType::Delete)
        || inner.get_first_option(CoapOption::Block1).is_some()
        || follow_up
    {
        return false;
    }
    let segments: Vec<&[u8]> = inner
        .get_option(CoapOption::UriPath)
        .map(|path| path.iter().map(Vec::as_slice).collect())
        .unwrap_or_default();
    segments == [b".well-known".as_slice(), b"atls".as_slice()]
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

    fn into_packet(self, request: &Packet, content_format: u16) -> Packet {
        let mut p = diagnostic(request, self.code, self.text);
        if let Some(alert) = self.alert {
            p.add_option(CoapOption::ContentFormat, uint_option(u64::from(content_format)));
            p.payload = alert;
        }
        if let Some(max_age) = self.max_age {
            p.add_option(CoapOption::MaxAge, uint_option(max_age));
        }
        p
    }
}

/// Log and count a handshake that failed.
fn handshake_failed(from: Endpoint, session: Option<SessionId>, error: &atls_core::Error) {
    let session = session.map_or_else(|| "-".to_owned(), SessionId::prefix);
    tracing::info!(
        target: "atls::handshake",
        transport = from.transport.scheme(),
        peer = %from.addr,
        session,
        %error,
        "ATLS handshake failed"
    );
    metrics::counter!("atls_handshakes_total", "outcome" => "failed", "reason" => "tls", "transport" => "coap").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: u8, port: u16) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, ip], port)),
            transport: Transport::Udp,
        }
    }

    #[test]
    fn the_endpoint_map_is_bounded_overall_and_per_address() {
        let t0 = Instant::now();
        let config = CoapConfig {
            max_endpoints: 3,
            max_endpoints_per_ip: 2,
            ..CoapConfig::default()
        };
        let mut peers = Peers::default();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(peers.with(endpoint(1, 1), at(1), &config, |_, _| ()).is_ok());
        assert!(peers.with(endpoint(1, 2), at(2), &config, |_, _| ()).is_ok());
        // A third port of the same address finds no room; nothing is pushed out.
        assert!(peers.with(endpoint(1, 3), at(3), &config, |_, _| ()).is_err());
        assert_eq!(peers.map.len(), 2);
        // Other addresses fill the map; the least recently seen goes first.
        peers.with(endpoint(1, 1), at(4), &config, |_, _| ()).ok();
        assert!(peers.with(endpoint(2, 1), at(5), &config, |_, _| ()).is_ok());
        assert!(peers.with(endpoint(3, 1), at(6), &config, |_, _| ()).is_ok());
        assert_eq!(peers.map.len(), 3);
        assert!(
            !peers.map.contains_key(&endpoint(1, 2)),
            "the least recently seen was forgotten"
        );
        assert!(peers.map.contains_key(&endpoint(1, 1)));
        assert_eq!(peers.order.len(), 3, "the order follows the map");
        assert_eq!(peers.per_ip.get(&endpoint(1, 1).addr.ip()), Some(&1));
    }

    #[test]
    fn block1_transfers_are_counted_and_expire() {
        let t0 = Instant::now();
        let config = CoapConfig::default();
        let mut peers = Peers::default();
        let first = BlockValue {
            num: 0,
            more: true,
            szx: 0,
        };
        peers
            .with(endpoint(1, 1), t0, &config, |p, transfers| {
                block1_step(&mut p.block1, *transfers, first, &[0; 16], None, 1024, t0)
            })
            .ok();
        assert_eq!(peers.transfers, 1);
        // A duplicate block changes nothing; a gap keeps the transfer.
        let dup = peers.with(endpoint(1, 1), t0, &config, |p, transfers| {
            block1_step(&mut p.block1, *transfers, first, &[0; 16], None, 1024, t0).map(|_| ())
        });
        assert!(matches!(dup, Ok(Ok(()))));
        let gap = BlockValue {
            num: 5,
            more: true,
            szx: 0,
        };
        let gapped = peers.with(endpoint(1, 1), t0, &config, |p, transfers| {
            block1_step(&mut p.block1, *transfers, gap, &[0; 16], None, 1024, t0).map(|_| ())
        });
        assert!(matches!(gapped, Ok(Err(BlockError::Incomplete))));
        assert_eq!(peers.transfers, 1, "still in progress");
        // Idle past its lifetime, it is dropped when touched.
        let later = t0 + BLOCK1_LIFETIME + Duration::from_secs(1);
        let next = BlockValue {
            num: 1,
            more: true,
            szx: 0,
        };
        let expired = peers.with(endpoint(1, 1), later, &config, |p, transfers| {
            block1_step(&mut p.block1, *transfers, next, &[0; 16], None, 1024, later).map(|_| ())
        });
        assert!(matches!(expired, Ok(Err(BlockError::Incomplete))));
        assert_eq!(peers.transfers, 0);
        peers.remove(&endpoint(1, 1));
        assert!(peers.map.is_empty() && peers.order.is_empty() && peers.per_ip.is_empty());
    }
}
