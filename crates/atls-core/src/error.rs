//! Typed errors of the ATLS core and its engines.

use std::fmt;

use crate::suites::CipherSuite;

/// Everything that can go wrong in an ATLS session.
///
/// Engine-specific error types never appear here: each engine maps its own
/// failures onto these variants, so callers handle one error type whatever
/// TLS stack runs underneath.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes pushed as a flight are not a sequence of well-formed TLS/DTLS records.
    #[error("malformed ATLS flight: {0}")]
    MalformedFlight(#[from] FlightError),
    /// The flight is larger than the session accepts.
    #[error("ATLS flight of {size} bytes exceeds the limit of {limit} bytes")]
    FlightTooLarge {
        /// Size of the rejected flight.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The same flight was pushed twice on a stream (TLS) session. The session
    /// is left untouched: the transport may answer with its previous response.
    #[error("duplicate ATLS flight (identical to the previous one); ignored")]
    DuplicateFlight,
    /// The peer sent a fatal TLS alert.
    #[error("TLS alert received from the peer: {0}")]
    AlertReceived(Alert),
    /// The peer's certificate (chain) did not verify against the configured trust anchors.
    #[error("peer certificate verification failed: {0}")]
    Verification(String),
    /// The TLS engine rejected the peer's messages (unexpected, malformed or
    /// out-of-order handshake). A fatal alert has been queued for the peer.
    #[error("TLS handshake failed: {0}")]
    Protocol(String),
    /// A DTLS handshake gave up after too many retransmissions.
    #[error("DTLS handshake timed out after repeated retransmissions")]
    HandshakeTimeout,
    /// The operation needs an established session.
    #[error("the ATLS handshake is not complete yet")]
    HandshakeNotComplete,
    /// The session was closed (close_notify sent or received) or failed earlier.
    #[error("the ATLS session is closed")]
    Closed,
    /// The negotiated cipher suite has no entry in the draft's §10 table.
    #[error("cipher suite {0} has no COSE/OSCORE mapping (draft-friel-tls-atls §10)")]
    UnmappedCipherSuite(CipherSuite),
    /// The configuration cannot be used (bad PEM, unknown suite, missing key, ...).
    #[error("invalid ATLS configuration: {0}")]
    Config(String),
    /// The engine cannot do what was asked (for example DTLS on rustls).
    #[error("the {engine} engine does not support {feature}")]
    Unsupported {
        /// Engine name.
        engine: &'static str,
        /// What was asked for.
        feature: &'static str,
    },
    /// Keying material export failed inside the engine.
    #[error("keying material export failed: {0}")]
    Export(String),
    /// An internal engine failure that is not the peer's fault.
    #[error("TLS engine failure: {0}")]
    Engine(String),
}

/// Why a pushed flight is not a valid sequence of records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlightError {
    /// Nothing was pushed.
    #[error("empty flight")]
    Empty,
    /// A record header or body is cut short.
    #[error("record at offset {offset} is truncated")]
    Truncated {
        /// Byte offset of the record in the flight.
        offset: usize,
    },
    /// A record's content type is not one TLS defines.
    #[error("record at offset {offset} has unknown content type {content_type}")]
    UnknownContentType {
        /// Byte offset of the record in the flight.
        offset: usize,
        /// The content type byte.
        content_type: u8,
    },
    /// A record carries a version that does not belong to this transport.
    #[error("record at offset {offset} has version {version:#06x}, not one of this session's")]
    BadVersion {
        /// Byte offset of the record in the flight.
        offset: usize,
        /// The version field.
        version: u16,
    },
    /// A record is longer than TLS allows (2^14 + 2048 bytes).
    #[error("record at offset {offset} declares {length} bytes, over the TLS maximum")]
    RecordTooLong {
        /// Byte offset of the record in the flight.
        offset: usize,
        /// The declared length.
        length: usize,
    },
    /// More records than a flight may hold.
    #[error("flight holds more than {limit} records")]
    TooManyRecords {
        /// The limit.
        limit: usize,
    },
}

/// A TLS alert description (RFC 8446 §6).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Alert(pub u8);

impl Alert {
    /// close_notify(0)
    pub const CLOSE_NOTIFY: Alert = Alert(0);
    /// unexpected_message(10)
    pub const UNEXPECTED_MESSAGE: Alert = Alert(10);
    /// handshake_failure(40)
    pub const HANDSHAKE_FAILURE: Alert = Alert(40);
    /// bad_certificate(42)
    pub const BAD_CERTIFICATE: Alert = Alert(42);
    /// unknown_ca(48)
    pub const UNKNOWN_CA: Alert = Alert(48);
    /// decrypt_error(51)
    pub const DECRYPT_ERROR: Alert = Alert(51);
    /// certificate_required(116)
    pub const CERTIFICATE_REQUIRED: Alert = Alert(116);

    /// The RFC name of the alert, if known.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "close_notify",
            10 => "unexpected_message",
            20 => "bad_record_mac",
            22 => "record_overflow",
            40 => "handshake_failure",
            42 => "bad_certificate",
            43 => "unsupported_certificate",
            44 => "certificate_revoked",
            45 => "certificate_expired",
            46 => "certificate_unknown",
            47 => "illegal_parameter",
            48 => "unknown_ca",
            49 => "access_denied",
            50 => "decode_error",
            51 => "decrypt_error",
            70 => "protocol_version",
            71 => "insufficient_security",
            80 => "internal_error",
            86 => "inappropriate_fallback",
            90 => "user_canceled",
            109 => "missing_extension",
            110 => "unsupported_extension",
            112 => "unrecognized_name",
            113 => "bad_certificate_status_response",
            115 => "unknown_psk_identity",
            116 => "certificate_required",
            120 => "no_application_protocol",
            _ => return None,
        })
    }
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "alert({})", self.0),
        }
    }
}

impl fmt::Debug for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
