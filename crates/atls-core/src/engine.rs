//! The small trait every TLS engine implements.
//!
//! An engine turns a [`ClientConfig`]/[`ServerConfig`] into an endpoint once
//! (parsing keys, building contexts) and then starts cheap per-session
//! [`TlsSession`]s. A `TlsSession` is a TLS or DTLS state machine with its
//! socket unplugged: record bytes go in, record bytes come out. Callers do not
//! use it directly; [`crate::Session`] wraps it with flight framing, limits and
//! the ATLS key schedule.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ClientConfig, ClientSessionParams, ServerConfig, ServerSessionParams, TlsVersion};
use crate::error::Error;
use crate::ext::NegotiatedCids;
use crate::records::Framing;
use crate::suites::CipherSuite;

/// What an engine can do, for contract tests and for callers choosing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Versions the engine implements.
    pub versions: &'static [TlsVersion],
    /// External PSK support.
    pub psk: bool,
    /// Custom extensions (`oscore_connection_id`, `cose_ext`).
    pub atls_extensions: bool,
    /// TLS 1.3 0-RTT.
    pub early_data: bool,
}

/// A TLS library that can run ATLS sessions.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Short name ("openssl", "rustls").
    fn name(&self) -> &'static str;
    /// What the engine supports.
    fn capabilities(&self) -> Capabilities;
    /// Build a client endpoint.
    fn client(&self, config: &ClientConfig) -> Result<Arc<dyn ClientEndpoint>, Error>;
    /// Build a server endpoint.
    fn server(&self, config: &ServerConfig) -> Result<Arc<dyn ServerEndpoint>, Error>;
}

/// A configured client: starts sessions and keeps their resumption state.
pub trait ClientEndpoint: Send + Sync + fmt::Debug {
    /// Start a client session. It produces its first flight when driven.
    fn start(&self, params: &ClientSessionParams) -> Result<Box<dyn TlsSession>, Error>;
    /// The configuration the endpoint was built from.
    fn config(&self) -> &ClientConfig;
    /// The engine name.
    fn engine_name(&self) -> &'static str;
}

/// A configured server: accepts sessions.
pub trait ServerEndpoint: Send + Sync + fmt::Debug {
    /// Start a server session, waiting for the client's first flight.
    fn accept(&self, params: &ServerSessionParams) -> Result<Box<dyn TlsSession>, Error>;
    /// The configuration the endpoint was built from.
    fn config(&self) -> &ServerConfig;
    /// The engine name.
    fn engine_name(&self) -> &'static str;
}

/// Who the peer proved to be.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerIdentity {
    /// The peer did not authenticate (a client without a certificate).
    Anonymous,
    /// The peer's certificate chain (DER, end-entity first).
    Certificates(Vec<crate::config::Certificate>),
    /// The external PSK identity both sides used.
    Psk(Vec<u8>),
}

/// What a completed handshake negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeInfo {
    /// Negotiated protocol version.
    pub version: TlsVersion,
    /// Negotiated cipher suite.
    pub cipher_suite: CipherSuite,
    /// The authenticated peer.
    pub peer: PeerIdentity,
    /// SNI: sent by the client / received by the server.
    pub server_name: Option<String>,
    /// `oscore_connection_id` CIDs.
    pub oscore_cids: NegotiatedCids,
    /// `cose_ext` CIDs.
    pub cose_cids: NegotiatedCids,
    /// Whether the session was resumed.
    pub resumed: bool,
    /// Whether 0-RTT data was accepted.
    pub early_data_accepted: bool,
}

/// A TLS/DTLS state machine driven over byte buffers.
///
/// Calling order: `push_*` the peer's bytes, then `process`, then
/// `take_output`; repeat. Errors from `process` are fatal for the session, but
/// output queued before the error (a fatal alert) can still be taken.
pub trait TlsSession: Send + fmt::Debug {
    /// Record framing of this session.
    fn framing(&self) -> Framing;
    /// Queue received bytes: a slice of the TLS byte stream, or one DTLS datagram.
    fn push_received(&mut self, bytes: &[u8]);
    /// Run the state machine over everything queued: advance the handshake,
    /// decrypt application data, process post-handshake messages.
    fn process(&mut self) -> Result<(), Error>;
    /// Move every record written since the last call into `out`.
    fn take_output(&mut self, out: &mut Vec<u8>);
    /// Whether the handshake is still running.
    fn is_handshaking(&self) -> bool;
    /// Encrypt application data into records.
    fn write_application_data(&mut self, data: &[u8]) -> Result<(), Error>;
    /// Move decrypted application data into `out`.
    fn read_application_data(&mut self, out: &mut Vec<u8>) -> Result<(), Error>;
    /// Client: send 0-RTT data in the first flight. Returns how much was accepted
    /// for sending (0 when no resumable session allows early data).
    fn write_early_data(&mut self, data: &[u8]) -> Result<usize, Error>;
    /// Server: move received 0-RTT data into `out`.
    fn read_early_data(&mut self, out: &mut Vec<u8>);
    /// RFC 5705 / RFC 8446 §7.5 exporter. `context: Some(&[])` is a zero-length
    /// context, which differs from `None` in (D)TLS 1.2.
    fn export_keying_material(
        &self,
        label: &[u8],
        context: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<(), Error>;
    /// What was negotiated, once the handshake is complete.
    fn handshake_info(&self) -> Option<HandshakeInfo>;
    /// Queue close_notify.
    fn send_close_notify(&mut self);
    /// Whether the peer sent close_notify.
    fn peer_closed(&self) -> bool;
    /// DTLS: time left until the retransmission timer fires; `None` when no timer runs.
    fn retransmission_timeout(&self) -> Option<Duration>;
    /// DTLS: the retransmission timer fired; retransmit the last flight if due.
    fn handle_retransmission_timeout(&mut self) -> Result<(), Error>;
}
