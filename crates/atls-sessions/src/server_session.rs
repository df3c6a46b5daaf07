//! One server session: its TLS state and, once established, the OSCORE and
//! COSE contexts exported from it.

use std::fmt;
use std::hash::BuildHasher;
use std::time::Instant;

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
pub struct ServerSession {
    session: Session,
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
            .field("session", &self.session)
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
            session,
            established: None,
            early: Vec::new(),
            max_message,
            records_abandoned: false,
            last_payload: None,
        })
    }

    /// The TLS session.
    pub fn session(&self) -> &Session {
        &self.session
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
        self.session.is_closed() && self.session.failure().is_none()
    }

    /// Whether records can still be exchanged: the TLS session neither
    /// failed nor closed, and was not abandoned. An established session
    /// whose records channel ended keeps its OSCORE and COSE contexts.
    pub fn records_open(&self) -> bool {
        !self.records_abandoned && !self.session.is_closed()
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
    /// step, e.g. a body was refused half-read); the exported contexts stay.
    pub fn abandon_records(&mut self) {
        self.records_abandoned = true;
    }

    /// Push one flight from the client; on success, what to answer and what
    /// arrived. A failure is fatal for the session.
    pub fn push_flight(&mut self, flight: &[u8], now: Instant) -> Result<Progress, FlightFailure> {
        if let Err(error) = self.session.push_flight(flight, now) {
            let alert = self.session.take_flight(now).ok().flatten();
            return Err(FlightFailure { error, alert });
        }
        let early = self.session.take_early_data();
        self.early.extend_from_slice(&early);
        let mut progress = Progress::default();
        if self.established.is_none() && self.session.is_handshake_complete() {
            self.established = Some(
                self.derive()
                    .map_err(|error| FlightFailure { error, alert: None })?,
            );
            progress.established = true;
        }
        progress.output = self
            .session
            .take_flight(now)
            .map_err(|error| FlightFailure { error, alert: None })?
            .unwrap_or_default();
        if self.established.is_some() {
            let received = self.session.take_received();
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
        self.session.send(data)?;
        Ok(self.session.take_flight(now)?.unwrap_or_default())
    }

    fn derive(&self) -> Result<Established, Error> {
        let info = self
            .session
            .handshake_info()
            .cloned()
            .ok_or(Error::HandshakeNotComplete)?;
        let context = |kind: ProtectionKind| -> Result<SecurityContext, Error> {
            let keys = self.session.atls_keys(kind)?;
            let ids = self.session.protection_ids(kind)?;
            // The keys die with this process's handshake state, so sequence
            // numbers may live in memory: no restarted server can hold these
            // keys again.
            let mut ctx = SecurityContext::new_in_memory(&ContextParams::from_atls(&keys, &ids))
                .map_err(|e| Error::Engine(format!("deriving the {kind:?} context: {e}")))?;
            ctx.set_max_message(self.max_message);
            Ok(ctx)
        };
        Ok(Established {
            oscore: context(ProtectionKind::Oscore)?,
            cose: context(ProtectionKind::Cose)?,
            info,
        })
    }
}
