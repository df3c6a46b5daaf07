//! The client: an ATLS handshake over CoAP (flights POSTed to
//! `/.well-known/atls`, in Block1 blocks when they do not fit one message,
//! answers fetched in Block2 blocks), then OSCORE requests with the context
//! of the `atls-oscore` export.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Instant;

use atls_core::{
    ClientEndpoint, ClientSessionParams, ConnectionId, Framing, HandshakeInfo, ProtectionKind, Session,
};
use atls_oscore::{ContextParams, OscoreError, SecurityContext};
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;

use crate::block::BlockValue;
use crate::server::{random, uint_option, CONTENT_FORMAT_ATLS};
use crate::udp::{exchange_non_on, exchange_on, ExchangeError, Plain, Transmission};

/// How an [`AtlsCoapClient`] talks to its server.
#[derive(Clone, Debug)]
pub struct CoapClientOptions {
    /// Content-Format number of ATLS payloads.
    pub content_format: u16,
    /// Block size of Block1 uploads and Block2 downloads (16..=1024).
    pub block_size: usize,
    /// CoAP retransmission parameters.
    pub transmission: Transmission,
    /// Offer the `oscore_connection_id` extension.
    pub offer_cids: bool,
    /// The name the server certificate must carry (and SNI).
    pub server_name: Option<String>,
    /// Largest server flight reassembled.
    pub max_flight: usize,
    /// What protects requests once the handshake is done.
    pub mode: CoapMode,
    /// How long the DTLS handshake of a CoAP-over-DTLS link may take.
    pub transport_timeout: std::time::Duration,
    /// Keep each handshake flight and its answer in its [`FlightTrip`]
    /// (for `atls request --dump-flights`).
    pub capture_flights: bool,
}

/// What protects requests after the ATLS handshake (draft §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoapMode {
    /// OSCORE (RFC 8613) with the context of the `atls-oscore` export.
    #[default]
    Oscore,
    /// Records mode: the request travels inside TLS records (RFC 8323
    /// framing over TLS, one RFC 7252 message per record over DTLS),
    /// POSTed to `/.well-known/atls`.
    Records,
}

impl Default for CoapClientOptions {
    fn default() -> Self {
        Self {
            content_format: CONTENT_FORMAT_ATLS,
            block_size: 512,
            transmission: Transmission::default(),
            offer_cids: true,
            server_name: None,
            max_flight: 64 * 1024,
            mode: CoapMode::Oscore,
            transport_timeout: std::time::Duration::from_secs(20),
            capture_flights: false,
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoapClientError {
    /// The CoAP exchange failed (no answer, reset, socket).
    #[error("transport: {0}")]
    Transport(#[from] ExchangeError),
    /// The TLS handshake failed on this side.
    #[error("ATLS handshake: {0}")]
    Handshake(#[from] atls_core::Error),
    /// The server answered a flight with an error code.
    #[error("ATLS handshake refused by the server ({code}): {diagnostic}")]
    Refused {
        /// The CoAP response code, as "4.00".
        code: String,
        /// The server's diagnostic payload, or the alert it sent.
        diagnostic: String,
    },
    /// Protection of the request or response failed.
    #[error("protection: {0}")]
    Protection(#[from] OscoreError),
    /// The DTLS session of a CoAP-over-DTLS link failed.
    #[error("CoAP over DTLS: {0}")]
    Link(#[from] crate::dtls::DtlsLinkError),
    /// The server answered something this client cannot use.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// One flight's trip, for tests and `-v` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlightTrip {
    /// Bytes of the flight sent.
    pub sent: usize,
    /// CoAP messages it took (Block1 blocks).
    pub blocks_sent: usize,
    /// Bytes of the answer.
    pub received: usize,
    /// CoAP messages the answer took (Block2 blocks).
    pub blocks_received: usize,
    /// The flight and the answer's payload, with
    /// [`CoapClientOptions::capture_flights`].
    pub bodies: Option<(Vec<u8>, Vec<u8>)>,
}

/// The transport under the client.
enum Link {
    Udp(UdpSocket),
    Tcp(tokio::sync::Mutex<crate::tcp::Connection>),
    Dtls(Box<tokio::sync::Mutex<crate::dtls::DtlsLink>>),
}

impl Link {
    fn is_reliable(&self) -> bool {
        matches!(self, Self::Tcp(_))
    }
}

/// How a request is sent.
#[derive(Clone, Copy)]
enum Delivery {
    /// Confirmable, retransmitted by CoAP (RFC 7252 §4.2); a reliable
    /// transport needs neither.
    Confirmable,
    /// Non-confirmable, sent once; the answer is awaited this long from
    /// the moment it is sent (what the ATLS layer's DTLS timer had left when
    /// the flight was taken), after which the caller decides.
    NonConfirmable(std::time::Duration),
}

struct Established {
    info: HandshakeInfo,
    oscore: SecurityContext,
    /// The TLS session, kept for records mode.
    session: Session,
}

/// An ATLS client of one CoAP server over UDP.
pub struct AtlsCoapClient {
    link: Link,
    server: SocketAddr,
    endpoint: Arc<dyn ClientEndpoint>,
    options: CoapClientOptions,
    next_mid: AtomicU16,
    state: tokio::sync::Mutex<Option<Established>>,
    trips: std::sync::Mutex<Vec<FlightTrip>>,
    /// Bytes of the last protected request and response messages.
    last_request: std::sync::Mutex<(usize, usize)>,
}

impl fmt::Debug for AtlsCoapClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtlsCoapClient")
            .field("server", &self.server)
            .field("engine", &self.endpoint.engine_name())
            .finish_non_exhaustive()
    }
}

fn code_text(code: MessageClass) -> String {
    let byte = u8::from(code);
    format!("{}.{:02}", byte >> 5, byte & 0x1F)
}

impl AtlsCoapClient {
    /// A client of `server`, from an ephemeral local UDP port.
    pub async fn new(
        server: SocketAddr,
        endpoint: Arc<dyn ClientEndpoint>,
        options: CoapClientOptions,
    ) -> Result<Self, CoapClientError> {
        let local: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await.map_err(ExchangeError::Io)?;
        Ok(Self::with_link(Link::Udp(socket), server, endpoint, options))
    }

    /// A client of `server` over CoAP over DTLS (`coaps://`, RFC 7252 §9):
    /// the DTLS session of `transport` (PSK or certificates) is the
    /// hop-by-hop link, and the ATLS session of `endpoint` runs end to end
    /// inside it. The DTLS handshake runs here.
    pub async fn new_dtls(
        server: SocketAddr,
        transport: Arc<dyn ClientEndpoint>,
        endpoint: Arc<dyn ClientEndpoint>,
        options: CoapClientOptions,
    ) -> Result<Self, CoapClientError> {
        let link = crate::dtls::DtlsLink::connect(
            server,
            transport,
            options.server_name.clone(),
            options.transport_timeout,
        )
        .await?;
        Ok(Self::with_link(
            Link::Dtls(Box::new(tokio::sync::Mutex::new(link))),
            server,
            endpoint,
            options,
        ))
    }

    /// What the DTLS handshake of a CoAP-over-DTLS link negotiated.
    pub async fn transport_info(&self) -> Option<HandshakeInfo> {
        match &self.link {
            Link::Dtls(link) => link.lock().await.handshake_info().cloned(),
            _ => None,
        }
    }

    /// A client of `server` over CoAP over TCP (RFC 8323). Flights and
    /// messages travel whole (no blockwise on a reliable transport).
    pub async fn new_tcp(
        server: SocketAddr,
        endpoint: Arc<dyn ClientEndpoint>,
        options: CoapClientOptions,
    ) -> Result<Self, CoapClientError> {
        let connection = crate::tcp::Connection::connect(server)
            .await
            .map_err(ExchangeError::Io)?;
        Ok(Self::with_link(
            Link::Tcp(tokio::sync::Mutex::new(connection)),
            server,
            endpoint,
            options,
        ))
    }

    fn with_link(
        link: Link,
        server: SocketAddr,
        endpoint: Arc<dyn ClientEndpoint>,
        options: CoapClientOptions,
    ) -> Self {
        Self {
            link,
            server,
            endpoint,
            options,
            next_mid: AtomicU16::new(u16::from_be_bytes(random::<2>())),
            state: tokio::sync::Mutex::new(None),
            trips: std::sync::Mutex::new(Vec::new()),
            last_request: std::sync::Mutex::new((0, 0)),
        }
    }

    /// The largest payload sent in one message: a block of size exponent
    /// `szx` over UDP; over TCP messages travel whole.
    fn block_size(&self, szx: u8) -> usize {
        match self.link {
            Link::Udp(_) | Link::Dtls(_) => BlockValue {
                num: 0,
                more: false,
                szx,
            }
            .size(),
            Link::Tcp(_) => crate::tcp::MAX_MESSAGE_SIZE,
        }
    }

    /// CoAP ping (RFC 7252 §4.3): an empty confirmable message, answered
    /// with a Reset.
    async fn ping(&self) -> Result<(), CoapClientError> {
        let mut ping = Packet::new();
        ping.header.code = MessageClass::Empty;
        ping.header.message_id = self.next_mid.fetch_add(1, Ordering::Relaxed);
        match self.exchange_once(ping, Delivery::Confirmable).await {
            Ok(_) | Err(CoapClientError::Transport(ExchangeError::Reset)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One exchange; `None` only when a non-confirmable request got no
    /// answer by its deadline.
    async fn exchange_once(
        &self,
        request: Packet,
        delivery: Delivery,
    ) -> Result<Option<Packet>, CoapClientError> {
        let t = &self.options.transmission;
        match (&self.link, delivery) {
            (Link::Udp(socket), Delivery::Confirmable) => {
                let mut link = Plain {
                    socket,
                    peer: self.server,
                };
                Ok(Some(exchange_on(&mut link, self.server, request, t).await?))
            }
            (Link::Udp(socket), Delivery::NonConfirmable(wait)) => {
                let mut link = Plain {
                    socket,
                    peer: self.server,
                };
                Ok(exchange_non_on(&mut link, request, tokio::time::Instant::now() + wait).await?)
            }
            (Link::Dtls(link), Delivery::Confirmable) => {
                let mut link = link.lock().await;
                match exchange_on(&mut *link, self.server, request.clone(), t).await {
                    // No answer: the server may have forgotten the DTLS
                    // session (restart, idle timeout). A new DTLS handshake
                    // and one more try; a request the server did process
                    // is refused as a replay by the ATLS layer.
                    Err(ExchangeError::Timeout(_)) => {
                        link.reconnect().await?;
                        Ok(Some(exchange_on(&mut *link, self.server, request, t).await?))
                    }
                    other => Ok(Some(other?)),
                }
            }
            (Link::Dtls(link), Delivery::NonConfirmable(wait)) => {
                let mut link = link.lock().await;
                Ok(exchange_non_on(&mut *link, request, tokio::time::Instant::now() + wait).await?)
            }
            (Link::Tcp(connection), _) => Ok(Some(
                connection
                    .lock()
                    .await
                    .exchange(&request, t.separate_timeout)
                    .await
                    .map_err(ExchangeError::Io)?,
            )),
        }
    }

    /// The local endpoint the server sees.
    pub async fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.link {
            Link::Udp(socket) => socket.local_addr(),
            Link::Tcp(connection) => connection.lock().await.local_addr(),
            Link::Dtls(link) => link.lock().await.local_addr(),
        }
    }

    /// The flights of the last handshake, in order.
    pub fn last_handshake(&self) -> Vec<FlightTrip> {
        self.trips.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Bytes of the last OSCORE-protected request and response, as CoAP
    /// messages on the wire.
    pub fn last_request(&self) -> (usize, usize) {
        self.last_request.lock().map(|l| *l).unwrap_or_default()
    }

    /// What the current session negotiated.
    pub async fn session_info(&self) -> Option<HandshakeInfo> {
        self.state.lock().await.as_ref().map(|e| e.info.clone())
    }

    fn message(&self, code: RequestType) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(code);
        p.header.message_id = self.next_mid.fetch_add(1, Ordering::Relaxed);
        p.set_token(random::<4>().to_vec());
        p
    }

    fn flight_request(&self) -> Packet {
        let mut p = self.message(RequestType::Post);
        p.add_option(CoapOption::UriPath, b".well-known".to_vec());
        p.add_option(CoapOption::UriPath, b"atls".to_vec());
        p.add_option(
            CoapOption::ContentFormat,
            uint_option(u64::from(self.options.content_format)),
        );
        p
    }

    /// One exchange; a 4.01 challenge carrying Echo (RFC 9175) is answered
    /// by repeating the request with that Echo value (a few times at most).
    async fn send(&self, request: Packet) -> Result<Packet, CoapClientError> {
        self.send_with(request, Delivery::Confirmable)
            .await?
            .ok_or_else(|| CoapClientError::Unexpected("no answer".into()))
    }

    /// [`Self::send`] with a delivery; `None` when a non-confirmable
    /// request got no answer in time.
    async fn send_with(
        &self,
        request: Packet,
        delivery: Delivery,
    ) -> Result<Option<Packet>, CoapClientError> {
        let mut request = request;
        let Some(mut answer) = self.exchange_once(request.clone(), delivery).await? else {
            return Ok(None);
        };
        for _ in 0..3 {
            let echo = answer.get_first_option(CoapOption::Unknown(252)).cloned();
            let challenged = answer.header.code == MessageClass::Response(ResponseType::Unauthorized)
                && answer.get_option(CoapOption::Oscore).is_none();
            let Some(value) = echo.filter(|_| challenged) else {
                break;
            };
            request.header.message_id = self.next_mid.fetch_add(1, Ordering::Relaxed);
            request.set_token(random::<4>().to_vec());
            request.clear_option(CoapOption::Unknown(252));
            request.add_option(CoapOption::Unknown(252), value);
            let Some(again) = self.exchange_once(request.clone(), delivery).await? else {
                return Ok(None);
            };
            answer = again;
        }
        Ok(Some(answer))
    }

    /// POST one flight, in Block1 blocks when needed; returns the answer,
    /// fetched in Block2 blocks when the server sent it so.
    async fn post_flight(&self, flight: &[u8]) -> Result<(Packet, Vec<u8>), CoapClientError> {
        self.post_flight_with(flight, Delivery::Confirmable)
            .await?
            .map(|(answer, body, _)| (answer, body))
            .ok_or_else(|| CoapClientError::Unexpected("no answer".into()))
    }

    /// [`Self::post_flight`] with a delivery for the message that completes
    /// the flight (the only one that reaches the TLS stack); Block1 blocks
    /// before it and Block2 follow-ups are confirmable. `None` when the
    /// completing message got no answer in time.
    async fn post_flight_with(
        &self,
        flight: &[u8],
        delivery: Delivery,
    ) -> Result<Option<(Packet, Vec<u8>, FlightTrip)>, CoapClientError> {
        let szx = BlockValue::szx_for(self.options.block_size);
        let size = self.block_size(szx);
        let mut trip = FlightTrip {
            sent: flight.len(),
            blocks_sent: 0,
            received: 0,
            blocks_received: 0,
            bodies: None,
        };
        let mut answer = None;
        if flight.len() <= size {
            let mut p = self.flight_request();
            p.payload = flight.to_vec();
            trip.blocks_sent = 1;
            let Some(a) = self.send_with(p, delivery).await? else {
                return Ok(None);
            };
            answer = Some(a);
        } else {
            let blocks: Vec<&[u8]> = flight.chunks(size).collect();
            for (num, chunk) in blocks.iter().enumerate() {
                let more = num + 1 < blocks.len();
                let mut p = self.flight_request();
                let value = BlockValue {
                    num: u32::try_from(num).unwrap_or(u32::MAX),
                    more,
                    szx,
                };
                p.add_option(CoapOption::Block1, value.encode());
                if num == 0 {
                    p.add_option(CoapOption::Size1, uint_option(flight.len() as u64));
                }
                p.payload = chunk.to_vec();
                trip.blocks_sent += 1;
                // Only the block that completes the flight reaches the TLS
                // stack; the others are CoAP's to deliver.
                let block_delivery = if more { Delivery::Confirmable } else { delivery };
                let Some(a) = self.send_with(p, block_delivery).await? else {
                    return Ok(None);
                };
                if more && a.header.code != MessageClass::Response(ResponseType::Continue) {
                    answer = Some(a);
                    break;
                }
                if !more {
                    answer = Some(a);
                }
            }
        }
        let first = answer.ok_or_else(|| CoapClientError::Unexpected("no answer".into()))?;
        let mut body = first.payload.clone();
        trip.blocks_received = 1;
        if let Some(value) = first.get_first_option(CoapOption::Block2) {
            let mut block =
                BlockValue::decode(value).map_err(|e| CoapClientError::Unexpected(e.to_string()))?;
            check_block(block, None, first.payload.len(), 1, self.options.max_flight)?;
            while block.more {
                if body.len() > self.options.max_flight {
                    return Err(CoapClientError::Unexpected(
                        "the server's flight exceeds the limit".into(),
                    ));
                }
                let mut p = self.flight_request();
                let next = BlockValue {
                    num: block.num.saturating_add(1),
                    more: false,
                    szx: block.szx,
                };
                p.add_option(CoapOption::Block2, next.encode());
                // The rest of an answer already made: CoAP's to deliver.
                let a = self.send(p).await?;
                if a.header.code != MessageClass::Response(ResponseType::Changed) {
                    return Err(CoapClientError::Refused {
                        code: code_text(a.header.code),
                        diagnostic: String::from_utf8_lossy(&a.payload).into_owned(),
                    });
                }
                // Every block must come from the body of the first (RFC
                // 7959 §2.4): a server that answered the flight again in
                // between (its DTLS stack retransmitted) has a new body.
                if a.get_first_option(CoapOption::ETag) != first.get_first_option(CoapOption::ETag) {
                    return match delivery {
                        Delivery::NonConfirmable(_) => Ok(None),
                        Delivery::Confirmable => Err(CoapClientError::Unexpected(
                            "Block2: the blocks come from different answers".into(),
                        )),
                    };
                }
                block = a
                    .get_first_option(CoapOption::Block2)
                    .map(|v| BlockValue::decode(v))
                    .transpose()
                    .map_err(|e| CoapClientError::Unexpected(e.to_string()))?
                    .ok_or_else(|| CoapClientError::Unexpected("a block without Block2".into()))?;
                trip.blocks_received += 1;
                check_block(
                    block,
                    Some(next),
                    a.payload.len(),
                    trip.blocks_received,
                    self.options.max_flight,
                )?;
                body.extend_from_slice(&a.payload);
            }
        }
        trip.received = body.len();
        if self.options.capture_flights {
            trip.bodies = Some((flight.to_vec(), body.clone()));
        }
        Ok(Some((first, body, trip)))
    }

    async fn handshake(&self) -> Result<Established, CoapClientError> {
        if let Ok(mut trips) = self.trips.lock() {
            trips.clear();
        }
        let params = ClientSessionParams {
            server_name: self.options.server_name.clone(),
            oscore_cid: if self.options.offer_cids {
                ConnectionId::new(random::<4>().to_vec()).ok()
            } else {
                None
            },
            cose_cid: None,
        };
        let mut session = Session::client(self.endpoint.as_ref(), &params)?;
        // DTLS as the ATLS layer over an unreliable link: flights travel in
        // non-confirmable messages and the DTLS timer alone retransmits
        // them (RFC 6347 §4.2.4), so CoAP and DTLS never both resend.
        let datagram = session.framing() == Framing::Dtls && !self.link.is_reliable();
        let mut timeouts = 0u32;
        loop {
            let Some(flight) = session.take_flight(Instant::now())? else {
                if session.is_handshake_complete() {
                    break;
                }
                if datagram {
                    self.dtls_timer(&mut session, &mut timeouts).await?;
                    continue;
                }
                return Err(atls_core::Error::Protocol("the handshake stalled".into()).into());
            };
            let delivery = if datagram {
                let wait = session
                    .next_timeout()
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or(std::time::Duration::from_secs(1))
                    .clamp(
                        std::time::Duration::from_millis(50),
                        std::time::Duration::from_secs(60),
                    );
                Delivery::NonConfirmable(wait)
            } else {
                Delivery::Confirmable
            };
            let Some((answer, body, trip)) = self.post_flight_with(&flight, delivery).await? else {
                // Lost on the way there or back: the DTLS timer resends.
                self.dtls_timer(&mut session, &mut timeouts).await?;
                continue;
            };
            timeouts = 0;
            if let Ok(mut trips) = self.trips.lock() {
                trips.push(trip);
            }
            if answer.header.code != MessageClass::Response(ResponseType::Changed) {
                if !answer.payload.is_empty() {
                    if let Err(atls_core::Error::AlertReceived(alert)) =
                        session.push_flight(&answer.payload, Instant::now())
                    {
                        return Err(CoapClientError::Refused {
                            code: code_text(answer.header.code),
                            diagnostic: format!("TLS alert {alert}"),
                        });
                    }
                }
                return Err(CoapClientError::Refused {
                    code: code_text(answer.header.code),
                    diagnostic: String::from_utf8_lossy(&answer.payload).into_owned(),
                });
            }
            if !body.is_empty() {
                session.push_flight(&body, Instant::now())?;
            }
            if session.is_handshake_complete() && !session.wants_write() {
                break;
            }
        }
        let info = session
            .handshake_info()
            .cloned()
            .ok_or(atls_core::Error::HandshakeNotComplete)?;
        let keys = session.atls_keys(ProtectionKind::Oscore)?;
        let ids = session.protection_ids(ProtectionKind::Oscore)?;
        let oscore = SecurityContext::new_in_memory(&ContextParams::from_atls(&keys, &ids))?;
        Ok(Established {
            info,
            oscore,
            session,
        })
    }

    /// Wait for the DTLS retransmission timer and let it fire (the flight
    /// it queues is taken by the caller); gives up after
    /// `MAX_RETRANSMIT` + 2 firings.
    async fn dtls_timer(&self, session: &mut Session, timeouts: &mut u32) -> Result<(), CoapClientError> {
        *timeouts += 1;
        if *timeouts == 1 && matches!(self.link, Link::Dtls(_)) {
            // No answer to a flight over a DTLS link: make sure the link
            // itself is alive (a CoAP ping, confirmable: a dead link is
            // reconnected on its timeout) before the ATLS layer resends.
            self.ping().await?;
        }
        if *timeouts > self.options.transmission.max_retransmit + 2 {
            return Err(ExchangeError::Timeout(self.server).into());
        }
        if let Some(at) = session.next_timeout() {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        session.handle_timeout(Instant::now())?;
        Ok(())
    }

    /// Send one inner CoAP request (code, Uri-Path, payload...) protected
    /// with OSCORE, handshaking first when there is no session. A payload
    /// larger than a block goes in inner Block1 blocks, a large response is
    /// fetched in inner Block2 blocks (RFC 8613 §4.1.3.4.2).
    pub async fn request(&self, inner: &Packet) -> Result<Packet, CoapClientError> {
        match self.request_once(inner).await {
            // The server no longer has the context (it restarted, or forgot
            // this endpoint; RFC 8613 §8.2 names it "Security context not
            // found"), or no session for records: it did not process the
            // request, so a new handshake and one more try is safe for any
            // method. Not after "Replay detected": that request may have
            // been processed (its answer lost).
            Err(CoapClientError::Refused { code, diagnostic })
                if (code == "4.01" && diagnostic != "Replay detected")
                    || (code == "4.04" && self.options.mode == CoapMode::Records) =>
            {
                *self.state.lock().await = None;
                self.request_once(inner).await
            }
            other => other,
        }
    }

    async fn request_once(&self, inner: &Packet) -> Result<Packet, CoapClientError> {
        let mut state = self.state.lock().await;
        if state.is_none() {
            *state = Some(self.handshake().await?);
        }
        let Some(est) = state.as_mut() else {
            return Err(CoapClientError::Unexpected("no session".into()));
        };
        let szx = BlockValue::szx_for(self.options.block_size);
        // Records over TLS carry whole messages (the outer POST goes
        // blockwise); a DTLS record carries at most a block; OSCORE
        // messages go in inner blocks on unreliable transports.
        let size = match (self.options.mode, est.session.framing()) {
            (CoapMode::Records, Framing::Tls) => crate::tcp::MAX_MESSAGE_SIZE,
            (CoapMode::Records, Framing::Dtls) => BlockValue {
                num: 0,
                more: false,
                szx,
            }
            .size(),
            _ => self.block_size(szx),
        };
        // RFC 7959 §2.4: on an unreliable link, ask for the answer in
        // blocks of this client's size from the start, so that a server
        // that cannot know the link (an HTTP terminator behind a gateway)
        // does not send more than one message can hold.
        let early_block2 = self.options.mode == CoapMode::Oscore && !self.link.is_reliable();
        let with_early_block2 = |p: &mut Packet| {
            if early_block2 && p.get_first_option(CoapOption::Block2).is_none() {
                p.add_option(
                    CoapOption::Block2,
                    BlockValue {
                        num: 0,
                        more: false,
                        szx,
                    }
                    .encode(),
                );
            }
        };
        let mut response = if inner.payload.len() <= size {
            let mut whole = inner.clone();
            with_early_block2(&mut whole);
            self.protected(est, &whole).await?
        } else {
            let blocks: Vec<&[u8]> = inner.payload.chunks(size).collect();
            let mut last = None;
            for (num, chunk) in blocks.iter().enumerate() {
                let more = num + 1 < blocks.len();
                let mut part = inner.clone();
                part.add_option(
                    CoapOption::Block1,
                    BlockValue {
                        num: u32::try_from(num).unwrap_or(u32::MAX),
                        more,
                        szx,
                    }
                    .encode(),
                );
                if num == 0 {
                    part.add_option(CoapOption::Size1, uint_option(inner.payload.len() as u64));
                }
                part.payload = chunk.to_vec();
                if !more {
                    with_early_block2(&mut part);
                }
                let answer = self.protected(est, &part).await?;
                let continues = answer.header.code == MessageClass::Response(ResponseType::Continue);
                if !more || !continues {
                    last = Some(answer);
                    break;
                }
            }
            last.ok_or_else(|| CoapClientError::Unexpected("no answer".into()))?
        };
        response.clear_option(CoapOption::Block1);
        let mut block = match response.get_first_option(CoapOption::Block2) {
            Some(v) => Some(BlockValue::decode(v).map_err(|e| CoapClientError::Unexpected(e.to_string()))?),
            None => None,
        };
        let max_response = self.options.max_flight.max(1 << 20);
        if let Some(b) = block {
            check_block(b, None, response.payload.len(), 1, max_response)?;
        }
        let mut count = 1usize;
        // Every block must come from the body the first one did.
        let first_tag = response.get_first_option(CoapOption::ETag).cloned();
        while let Some(b) = block.filter(|b| b.more) {
            if response.payload.len() > max_response {
                return Err(CoapClientError::Unexpected(
                    "the response exceeds the limit".into(),
                ));
            }
            let mut next = inner.clone();
            next.payload.clear();
            let value = BlockValue {
                num: b.num.saturating_add(1),
                more: false,
                szx: b.szx,
            };
            next.add_option(CoapOption::Block2, value.encode());
            let part = self.protected(est, &next).await?;
            let got = part
                .get_first_option(CoapOption::Block2)
                .map(|v| BlockValue::decode(v))
                .transpose()
                .map_err(|e| CoapClientError::Unexpected(e.to_string()))?;
            count += 1;
            let Some(g) = got else {
                return Err(CoapClientError::Unexpected(
                    "Block2: a block without Block2".into(),
                ));
            };
            check_block(g, Some(value), part.payload.len(), count, max_response)?;
            if part.get_first_option(CoapOption::ETag).cloned() != first_tag {
                return Err(CoapClientError::Unexpected(
                    "Block2: the answer changed between blocks (ETag)".into(),
                ));
            }
            response.payload.extend_from_slice(&part.payload);
            block = Some(g);
        }
        response.clear_option(CoapOption::Block2);
        response.clear_option(CoapOption::Size2);
        Ok(response)
    }

    /// One protected exchange of `inner`, in the configured mode.
    async fn protected(&self, est: &mut Established, inner: &Packet) -> Result<Packet, CoapClientError> {
        match self.options.mode {
            CoapMode::Oscore => self.oscore_exchange(est, inner).await,
            CoapMode::Records => self.records_exchange(est, inner).await,
        }
    }

    /// One records-mode exchange: `inner` inside TLS records (an RFC 8323
    /// frame over TLS, one RFC 7252 message in one record over DTLS),
    /// POSTed to `/.well-known/atls`; the answer's records carry the response.
    async fn records_exchange(
        &self,
        est: &mut Established,
        inner: &Packet,
    ) -> Result<Packet, CoapClientError> {
        let framing = est.session.framing();
        let mut message = inner.clone();
        let token = random::<4>().to_vec();
        message.set_token(token.clone());
        let mid = self.next_mid.fetch_add(1, Ordering::Relaxed);
        let bytes = match framing {
            Framing::Tls => {
                crate::tcp::encode(&message).map_err(|e| CoapClientError::Unexpected(e.to_string()))?
            }
            Framing::Dtls => {
                message.header.set_type(coap_lite::MessageType::Confirmable);
                message.header.message_id = mid;
                message.to_bytes().map_err(|e| {
                    CoapClientError::Unexpected(format!("the request does not fit one record: {e}"))
                })?
            }
        };
        est.session.send(&bytes)?;
        let records = est.session.take_flight(Instant::now())?.unwrap_or_default();
        let sent = records.len();
        let (answer, body) = self.post_flight(&records).await?;
        if let Ok(mut last) = self.last_request.lock() {
            *last = (sent, body.len());
        }
        if answer.header.code != MessageClass::Response(ResponseType::Changed) {
            return Err(CoapClientError::Refused {
                code: code_text(answer.header.code),
                diagnostic: String::from_utf8_lossy(&answer.payload).into_owned(),
            });
        }
        let mut messages = Vec::new();
        match framing {
            Framing::Tls => {
                est.session.push_flight(&body, Instant::now())?;
                let data = est.session.take_received();
                let mut rest = data.as_slice();
                while !rest.is_empty() {
                    let len = crate::tcp::frame_len(rest)
                        .filter(|n| *n <= rest.len())
                        .ok_or_else(|| {
                            CoapClientError::Unexpected("records mode: a cut CoAP frame".into())
                        })?;
                    let (frame, tail) = rest.split_at(len);
                    let (_, packet) =
                        crate::tcp::decode(frame).map_err(|e| CoapClientError::Unexpected(e.to_string()))?;
                    messages.push(packet);
                    rest = tail;
                }
            }
            Framing::Dtls => {
                let records = atls_core::records::split_records(framing, &body)
                    .map_err(|e| CoapClientError::Unexpected(e.to_string()))?;
                for record in records {
                    est.session.push_flight(record.bytes, Instant::now())?;
                    let data = est.session.take_received();
                    if data.is_empty() {
                        continue;
                    }
                    crate::message::validate(&data)
                        .map_err(|e| CoapClientError::Unexpected(format!("records mode: {e}")))?;
                    messages.push(
                        Packet::from_bytes(&data).map_err(|e| CoapClientError::Unexpected(e.to_string()))?,
                    );
                }
            }
        }
        messages
            .into_iter()
            .find(|m| m.get_token() == token.as_slice() && matches!(m.header.code, MessageClass::Response(_)))
            .ok_or_else(|| CoapClientError::Unexpected("records mode: no response to the request".into()))
    }

    /// One OSCORE-protected exchange of `inner`.
    async fn oscore_exchange(
        &self,
        est: &mut Established,
        inner: &Packet,
    ) -> Result<Packet, CoapClientError> {
        let (mut outer, binding) = atls_oscore::protect_request(&mut est.oscore, inner)?;
        outer.header.message_id = self.next_mid.fetch_add(1, Ordering::Relaxed);
        outer.set_token(random::<4>().to_vec());
        let sent = outer.to_bytes().map(|b| b.len()).unwrap_or(0);
        let answer = self.send(outer).await?;
        if let Ok(mut last) = self.last_request.lock() {
            *last = (sent, answer.to_bytes().map(|b| b.len()).unwrap_or(0));
        }
        if answer.get_option(CoapOption::Oscore).is_none() {
            return Err(CoapClientError::Refused {
                code: code_text(answer.header.code),
                diagnostic: String::from_utf8_lossy(&answer.payload).into_owned(),
            });
        }
        Ok(atls_oscore::unprotect_response(
            &mut est.oscore,
            &answer,
            &binding,
        )?)
    }
}

/// A Block2 block is usable: the one asked for (`expected`), at the same
/// size, full when more follow, and not beyond what `max` bytes can take.
fn check_block(
    got: BlockValue,
    expected: Option<BlockValue>,
    payload: usize,
    count: usize,
    max: usize,
) -> Result<(), CoapClientError> {
    let bad = |what: &str| Err(CoapClientError::Unexpected(format!("Block2: {what}")));
    if let Some(expected) = expected {
        if got.num != expected.num || got.szx != expected.szx {
            return bad("the server sent another block");
        }
    }
    if got.more && payload != got.size() {
        return bad("a block that is not full announces more");
    }
    if count > max / 16 + 1 {
        return bad("more blocks than the limit allows");
    }
    Ok(())
}

/// An inner request: `method` on `path` (segments separated by `/`) with `payload`.
pub fn inner_request(method: RequestType, path: &str, payload: &[u8]) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(method);
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    p
}
