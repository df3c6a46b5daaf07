//! [`Session`]: one ATLS session, flight in, flight out.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::{ClientSessionParams, Limits, ServerSessionParams};
use crate::engine::{ClientEndpoint, HandshakeInfo, ServerEndpoint, TlsSession};
use crate::error::Error;
use crate::ext::{protection_ids, ProtectionIds, ProtectionKind};
use crate::keys::{AtlsKeys, SecretBytes, EXPORT_CONTEXT};
use crate::records::{split_records, Framing};

/// Which end of the handshake a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends the ClientHello.
    Client,
    /// Answers it.
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Client not yet driven: its first flight is produced on the first
    /// `take_flight` or `write_early_data`.
    NotStarted,
    Handshaking,
    Established,
    Closed,
    Failed(Error),
}

/// One ATLS session over any TLS engine.
///
/// The session does no IO and reads no clock. The calling order is:
///
/// 1. A client calls [`Session::take_flight`] and sends the flight to the
///    server (one HTTP body or CoAP payload). A server creates its session on
///    the first flight it receives.
/// 2. Each side [`Session::push_flight`]s what it received, then
///    [`Session::take_flight`]s its answer (possibly nothing) and sends it.
/// 3. Once [`Session::is_handshake_complete`], either exchange application
///    data as records ([`Session::send`], [`Session::take_received`]; draft
///    Figure 5) or export keys ([`Session::atls_keys`]; Figure 6).
/// 4. DTLS sessions also ask to be woken at [`Session::next_timeout`] and are
///    told so with [`Session::handle_timeout`].
///
/// A flight that breaks the session returns an error; a fatal alert for the
/// peer may then still be waiting in [`Session::take_flight`].
pub struct Session {
    tls: Box<dyn TlsSession>,
    role: Role,
    engine: &'static str,
    state: State,
    limits: Limits,
    output: Vec<u8>,
    received: Vec<u8>,
    early_received: Vec<u8>,
    last_flight: Option<(usize, u64)>,
    deadline: Option<Instant>,
    info: Option<HandshakeInfo>,
    flights_in: u32,
    flights_out: u32,
}

/// Longest retransmission timer reported (RFC 6347 caps at 60 s).
const MAX_TIMER: Duration = Duration::from_secs(3600);

fn flight_hasher() -> &'static RandomState {
    static HASHER: OnceLock<RandomState> = OnceLock::new();
    HASHER.get_or_init(RandomState::new)
}

impl Session {
    /// Start a client session on `endpoint`.
    pub fn client(endpoint: &dyn ClientEndpoint, params: &ClientSessionParams) -> Result<Self, Error> {
        let tls = endpoint.start(params)?;
        Ok(Self::new(
            tls,
            Role::Client,
            endpoint.engine_name(),
            endpoint.config().common.limits,
        ))
    }

    /// Start a server session on `endpoint`; feed it the client's first flight.
    pub fn server(endpoint: &dyn ServerEndpoint, params: &ServerSessionParams) -> Result<Self, Error> {
        let tls = endpoint.accept(params)?;
        Ok(Self::new(
            tls,
            Role::Server,
            endpoint.engine_name(),
            endpoint.config().common.limits,
        ))
    }

    fn new(tls: Box<dyn TlsSession>, role: Role, engine: &'static str, limits: Limits) -> Self {
        Self {
            tls,
            role,
            engine,
            state: match role {
                Role::Client => State::NotStarted,
                Role::Server => State::Handshaking,
            },
            limits,
            output: Vec::new(),
            received: Vec::new(),
            early_received: Vec::new(),
            last_flight: None,
            deadline: None,
            info: None,
            flights_in: 0,
            flights_out: 0,
        }
    }

    /// Client or server.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The engine running this session.
    pub fn engine_name(&self) -> &'static str {
        self.engine
    }

    /// Record framing (TLS or DTLS).
    pub fn framing(&self) -> Framing {
        self.tls.framing()
    }

    /// The bounds in force (from the endpoint's configuration unless
    /// [`Session::set_limits`] replaced them).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Replace the bounds of this session: a transport that accepts larger
    /// bodies than the endpoint's defaults (an HTTP server configured for
    /// 1 MiB requests) sets them from its own limits, in one place.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Flights received and sent so far.
    pub fn flight_counts(&self) -> (u32, u32) {
        (self.flights_in, self.flights_out)
    }

    /// Push one whole flight received from the peer.
    ///
    /// `now` is the caller's clock; it only matters for DTLS timers.
    pub fn push_flight(&mut self, flight: &[u8], now: Instant) -> Result<(), Error> {
        self.check_usable()?;
        if flight.len() > self.limits.max_flight_len {
            return Err(Error::FlightTooLarge {
                size: flight.len(),
                limit: self.limits.max_flight_len,
            });
        }
        let framing = self.tls.framing();
        let records = split_records(framing, flight)?;
        if self.state == State::NotStarted {
            // A client must send before it can receive.
            return Err(Error::Protocol(
                "received a flight before sending the first one".into(),
            ));
        }
        let fingerprint = (flight.len(), flight_hasher().hash_one(flight));
        if framing == Framing::Tls && self.last_flight == Some(fingerprint) {
            // On a reliable transport the same bytes twice can only be a
            // replayed request; the engine never sees them.
            return Err(Error::DuplicateFlight);
        }
        self.last_flight = Some(fingerprint);
        self.flights_in = self.flights_in.saturating_add(1);
        match framing {
            Framing::Tls => self.tls.push_received(flight),
            // One record per datagram: DTLS engines read datagram by datagram.
            Framing::Dtls => records.iter().for_each(|r| self.tls.push_received(r.bytes)),
        }
        self.drive(now)
    }

    /// Take the next flight to send; `None` when there is nothing to send.
    pub fn take_flight(&mut self, now: Instant) -> Result<Option<Vec<u8>>, Error> {
        if self.state == State::NotStarted {
            self.state = State::Handshaking;
            self.drive(now)?;
        }
        if self.output.is_empty() {
            return Ok(None);
        }
        self.flights_out = self.flights_out.saturating_add(1);
        Ok(Some(std::mem::take(&mut self.output)))
    }

    /// Whether output is waiting to be taken.
    pub fn wants_write(&self) -> bool {
        !self.output.is_empty()
    }

    /// Whether the handshake has completed.
    pub fn is_handshake_complete(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the session has ended (closed or failed).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed | State::Failed(_))
    }

    /// The error that ended the session, if it failed.
    pub fn failure(&self) -> Option<&Error> {
        match &self.state {
            State::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Encrypt application data into TLS records (draft Figure 5); take them
    /// with [`Session::take_flight`].
    pub fn send(&mut self, data: &[u8]) -> Result<(), Error> {
        self.check_usable()?;
        if self.state != State::Established {
            return Err(Error::HandshakeNotComplete);
        }
        self.tls.write_application_data(data)?;
        self.tls.take_output(&mut self.output);
        Ok(())
    }

    /// Application data received so far (draft Figure 5).
    pub fn take_received(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.received)
    }

    /// Client: queue TLS 1.3 0-RTT data before the first flight is taken.
    /// Returns how many bytes will travel as early data (0 when the engine has
    /// no resumable session that allows it).
    pub fn write_early_data(&mut self, data: &[u8], now: Instant) -> Result<usize, Error> {
        if self.role != Role::Client || self.state != State::NotStarted {
            return Err(Error::Protocol(
                "early data is written by a client before its first flight".into(),
            ));
        }
        let written = self.tls.write_early_data(data)?;
        self.state = State::Handshaking;
        self.drive(now)?;
        Ok(written)
    }

    /// Server: 0-RTT data received with the client's first flight.
    pub fn take_early_data(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.early_received)
    }

    /// What the handshake negotiated; `None` until it completes.
    pub fn handshake_info(&self) -> Option<&HandshakeInfo> {
        self.info.as_ref()
    }

    /// Export keying material with any label (RFC 5705 / RFC 8446 §7.5).
    /// `context: Some(&[])` is the empty context the draft uses; `None` is "no
    /// context", which differs in (D)TLS 1.2.
    pub fn export_keying_material(
        &self,
        label: &[u8],
        context: Option<&[u8]>,
        len: usize,
    ) -> Result<SecretBytes, Error> {
        if self.state != State::Established {
            return Err(Error::HandshakeNotComplete);
        }
        if len == 0 || len > 1024 {
            return Err(Error::Export(format!("export length {len} outside 1..=1024")));
        }
        let mut out = vec![0u8; len];
        self.tls.export_keying_material(label, context, &mut out)?;
        Ok(SecretBytes::new(out))
    }

    /// The draft's §9 export for OSCORE or COSE: label `atls-oscore` or
    /// `atls-cose`, empty context, 2 × the AEAD key length of the §10 mapping;
    /// first half Master Secret, second half Master Salt.
    pub fn atls_keys(&self, kind: ProtectionKind) -> Result<AtlsKeys, Error> {
        let info = self.handshake_info().ok_or(Error::HandshakeNotComplete)?;
        let algorithms = info.cipher_suite.atls_mapping()?;
        let export =
            self.export_keying_material(kind.label(), Some(EXPORT_CONTEXT), algorithms.export_len())?;
        Ok(AtlsKeys::split(kind, algorithms, export.dangerous_as_bytes()))
    }

    /// This side's Sender/Recipient IDs (OSCORE) or kids (COSE): from the §11
    /// extension when negotiated, otherwise the fallback IDs.
    pub fn protection_ids(&self, kind: ProtectionKind) -> Result<ProtectionIds, Error> {
        let info = self.handshake_info().ok_or(Error::HandshakeNotComplete)?;
        let cids = match kind {
            ProtectionKind::Oscore => &info.oscore_cids,
            ProtectionKind::Cose => &info.cose_cids,
        };
        Ok(protection_ids(self.role == Role::Client, cids))
    }

    /// Send close_notify; take it with [`Session::take_flight`].
    pub fn close(&mut self) {
        if matches!(self.state, State::Handshaking | State::Established) {
            self.tls.send_close_notify();
            self.tls.take_output(&mut self.output);
            self.state = State::Closed;
        }
    }

    /// DTLS: when the caller must call [`Session::handle_timeout`] next.
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshaking => self.deadline,
            _ => None,
        }
    }

    /// DTLS: the caller's timer fired at `now`. Retransmits the last flight
    /// when it is due; take it with [`Session::take_flight`].
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        if self.state != State::Handshaking {
            return Ok(());
        }
        match self.deadline {
            Some(deadline) if now >= deadline => {}
            _ => return Ok(()),
        }
        let result = self.tls.handle_retransmission_timeout();
        self.tls.take_output(&mut self.output);
        if let Err(e) = result {
            self.state = State::Failed(e.clone());
            return Err(e);
        }
        self.update_deadline(now);
        Ok(())
    }

    fn check_usable(&self) -> Result<(), Error> {
        match &self.state {
            State::Closed => Err(Error::Closed),
            State::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    fn update_deadline(&mut self, now: Instant) {
        self.deadline = self
            .tls
            .retransmission_timeout()
            .map(|left| now.checked_add(left.min(MAX_TIMER)).unwrap_or(now));
    }

    fn drive(&mut self, now: Instant) -> Result<(), Error> {
        let result = self.tls.process();
        self.tls.take_output(&mut self.output);
        if self.role == Role::Server {
            self.tls.read_early_data(&mut self.early_received);
        }
        if let Err(e) = result {
            self.state = State::Failed(e.clone());
            return Err(e);
        }
        if self.state == State::Handshaking && !self.tls.is_handshaking() {
            self.info = self.tls.handshake_info();
            if self.info.is_none() {
                let e = Error::Engine("handshake complete but its parameters are unavailable".into());
                self.state = State::Failed(e.clone());
                return Err(e);
            }
            self.state = State::Established;
        }
        if self.state == State::Established {
            self.tls.read_application_data(&mut self.received)?;
            if self.received.len() > self.limits.max_buffered_application_data {
                let e = Error::Protocol("peer sent more application data than the session buffers".into());
                self.state = State::Failed(e.clone());
                return Err(e);
            }
            if self.tls.peer_closed() {
                self.state = State::Closed;
            }
        }
        self.update_deadline(now);
        Ok(())
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("engine", &self.engine)
            .field("state", &self.state)
            .field("pending_output", &self.output.len())
            .finish_non_exhaustive()
    }
}
