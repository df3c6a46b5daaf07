//! One server session: its TLS state and, once established, the OSCORE and
//! COSE contexts exported from it.

use std::fmt;
use std::hash::BuildHasher;
use std::time::Instant;

use atls_core::records::Framing;
use atls_core::{
    ConnectionId, Error, HandshakeInfo, Limits, ProtectionKind, ServerEndpoint, ServerSessionParams, Session,
};
use atls_oscore::{ContextParams, SecurityContext};

use crate::table::Admission;

fn payload_hasher() -> &'static std::collections::hash_map::RandomState {
    static HASHER: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    HASHER.get_or_init(std::collections::hash_map::RandomState::new)
}

/// What an established session protects application messages with.
pub struct Established {
    /// What the handshake negotiated.
    pub info: HandshakeInfo,
    /// The OSCORE context of the `atls-oscore` export (draft §9.1).
    pub oscore: SecurityContext,
    /// The COSE profile's context of the `atls-cose` export (§9.2).
    pub cose: SecurityContext,
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Established")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// What one pushed flight produced.
#[derive(Debug, Default)]
pub struct Progress {
    /// The flight to answer with (possibly empty).
    pub output: Vec<u8>,
    /// The handshake completed with this flight.
    pub established: bool,
    /// Application data received, once established; data that arrived as
    /// 0-RTT comes first and is released only once the handshake completes
    /// (a replayed ClientHello cannot complete it).
    pub application_data: Vec<u8>,
    /// Whether `application_data` began as 0-RTT data.
    pub early_data: bool,
}

/// A flight that broke the session, and the alert flight to answer with.
#[derive(Debug)]
pub struct FlightFailure {
    /// What went wrong.
    pub error: Error,
    /// The TLS alert the engine queued for the peer, if any.
    pub alert: Option<Vec<u8>>,
}

/// A server session over any engine.
///
/// Once the client protects a request with the exported keys (OSCORE or
/// COSE), the TLS engine's state — its record buffers, traffic keys and
/// handshake leftovers, tens of KiB on some engines — has no further use:
/// [`ServerSession::release_engine`] drops it and the records channel ends.
/// What stays is the negotiated parameters and the two exported contexts.
pub struct ServerSession {
    /// The TLS session; `None` once released.
    tls: Option<Session>,
    engine: &'static str,
    framing: Framing,
    established: Option<Established>,
    early: Vec<u8>,
    max_message: usize,
    records_abandoned: bool,
    /// Fingerprint of the start of the last payload pushed.
    last_payload: Option<u64>,
}

impl fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSession")
            .field("session", &self.tls)
            .field("engine", &self.engine)
            .field("established", &self.established.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerSession {
    /// Start a session for an admitted first flight: the server CIDs are the
    /// admission's, `limits` bound the TLS session and `max_message` the
    /// OSCORE/COSE messages of its contexts.
    pub fn accept<E>(
        endpoint: &dyn ServerEndpoint,
        admission: &Admission<'_, E>,
        limits: Limits,
        max_message: usize,
    ) -> Result<Self, Error> {
        let params = ServerSessionParams {
            oscore_cid: Some(ConnectionId::new(admission.oscore_cid().to_vec())?),
            cose_cid: Some(ConnectionId::new(admission.cose_cid().to_vec())?),
            ..ServerSessionParams::default()
        };
        let mut session = Session::server(endpoint, &params)?;
        session.set_limits(limits);
        Ok(Self {
            engine: session.engine_name(),
            framing: session.framing(),
            tls: Some(session),
            established: None,
            early: Vec::new(),
            max_message,
            records_abandoned: false,
            last_payload: None,
        })
    }

    /// The TLS session; `None` once [`ServerSession::release_engine`]
    /// dropped it.
    pub fn session(&self) -> Option<&Session> {
        self.tls.as_ref()
    }

    /// The engine that ran the handshake.
    pub fn engine_name(&self) -> &'static str {
        self.engine
    }

    /// Record framing of the session (TLS or DTLS).
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// What the handshake negotiated, once it completed.
    pub fn handshake_info(&self) -> Option<&HandshakeInfo> {
        self.established.as_ref().map(|e| &e.info)
    }

    /// Whether the engine's state is still held (the handshake is under way,
    /// or records may still be exchanged).
    pub fn holds_engine(&self) -> bool {
        self.tls.is_some()
    }

    /// The client uses the exported keys: drop the TLS engine's state and end
    /// the records channel. Only an established session releases its
    /// engine; a handshake under way keeps it.
    pub fn release_engine(&mut self) {
        if self.established.is_some() && self.tls.is_some() {
            self.tls = None;
            self.early = Vec::new();
        }
    }

    /// The exported contexts, once the handshake completed.
    pub fn established(&self) -> Option<&Established> {
        self.established.as_ref()
    }

    /// The exported contexts, mutably (to protect and verify messages).
    pub fn established_mut(&mut self) -> Option<&mut Established> {
        self.established.as_mut()
    }

    /// Whether the peer ended the session with close_notify (authenticated
    /// once the handshake is complete).
    pub fn peer_closed(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|s| s.is_closed() && s.failure().is_none())
    }

    /// Whether records can still be exchanged: the TLS session neither
    /// failed nor closed, and was not abandoned. An established session
    /// whose records channel ended keeps its OSCORE and COSE contexts.
    pub fn records_open(&self) -> bool {
        !self.records_abandoned && self.tls.as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Whether `payload` starts like the previous payload given here (and
    /// remember it otherwise). Two payloads of one TLS session never start
    /// alike — every record carries fresh ciphertext — so a match is a
    /// resent payload, e.g. a retried POST, however it is split for
    /// streaming. A transport refuses it before the TLS stack sees it.
    pub fn repeats_previous_payload(&mut self, payload: &[u8]) -> bool {
        let start = payload.get(..payload.len().min(256)).unwrap_or_default();
        let fingerprint = payload_hasher().hash_one((payload.len().min(256), start));
        if self.last_payload == Some(fingerprint) {
            return true;
        }
        self.last_payload = Some(fingerprint);
        false
    }

    /// Give up the records channel (its two record sequences are out of
    /// step, e.g. a body was refused half-read); the exported contexts stay,
    /// and an established session's engine state is dropped.
    pub fn abandon_records(&mut self) {
        self.records_abandoned = true;
        self.release_engine();
    }

    /// Push one flight from the client; on success, what to answer and what
    /// arrived. A failure is fatal for the session.
    pub fn push_flight(&mut self, flight: &[u8], now: Instant) -> Result<Progress, FlightFailure> {
        let Some(session) = self.tls.as_mut() else {
            return Err(FlightFailure {
                error: Error::Closed,
                alert: None,
            });
        };
        if let Err(error) = session.push_flight(flight, now) {
            let alert = session.take_flight(now).ok().flatten();
            return Err(FlightFailure { error, alert });
        }
        let early = session.take_early_data();
        self.early.extend_from_slice(&early);
        let mut progress = Progress::default();
        if self.established.is_none() && session.is_handshake_complete() {
            self.established = Some(
                derive(session, self.max_message).map_err(|error| FlightFailure { error, alert: None })?,
            );
            progress.established = true;
        }
        progress.output = session
            .take_flight(now)
            .map_err(|error| FlightFailure { error, alert: None })?
            .unwrap_or_default();
        if self.established.is_some() {
            let received = session.take_received();
            if self.early.is_empty() {
                progress.application_data = received;
            } else {
                progress.early_data = true;
                let mut data = std::mem::take(&mut self.early);
                data.extend_from_slice(&received);
                progress.application_data = data;
            }
        }
        Ok(progress)
    }

    /// Encrypt application data into records and take them (with anything
    /// else the engine queued).
    pub fn send(&mut self, data: &[u8], now: Instant) -> Result<Vec<u8>, Error> {
        let session = self.tls.as_mut().ok_or(Error::Closed)?;
        session.send(data)?;
        Ok(session.take_flight(now)?.unwrap_or_default())
    }
}

fn derive(session: &Session, max_message: usize) -> Result<Established, Error> {
    let info = session
        .handshake_info()
        .cloned()
        .ok_or(Error::HandshakeNotComplete)?;
    let context = |kind: ProtectionKind| -> Result<SecurityContext, Error> {
        let keys = session.atls_keys(kind)?;
        let ids = session.protection_ids(kind)?;
        // The keys die with this process's handshake state, so sequence
        // numbers may live in memory: no restarted server can hold these
        // keys again.
        let mut ctx = SecurityContext::new_in_memory(&ContextParams::from_atls(&keys, &ids))
            .map_err(|e| Error::Engine(format!("deriving the {kind:?} context: {e}")))?;
        ctx.set_max_message(max_message);
        Ok(ctx)
    };
    Ok(Established {
        oscore: context(ProtectionKind::Oscore)?,
        cose: context(ProtectionKind::Cose)?,
        info,
    })
}
