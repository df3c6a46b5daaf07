//! Sans-IO core of Application-Layer TLS (ATLS, draft-friel-tls-atls).
//!
//! ATLS runs a standard TLS or DTLS handshake whose flights travel as opaque
//! payloads of another protocol (an HTTP body, a CoAP payload), then either
//! keeps exchanging TLS records or exports keys (RFC 5705) for OSCORE or COSE.
//!
//! This crate does no IO, spawns nothing and reads no clock: bytes go in and
//! out of a [`Session`], and the caller passes the current [`std::time::Instant`]
//! where timers matter (DTLS). TLS engines plug in through the small
//! [`engine::Engine`] trait; the `atls-openssl` and `atls-rustls` crates
//! provide two.
//!
//! Modules:
//! - [`session`]: the flight-oriented session every transport drives;
//! - [`suites`]: the draft's §10 cipher-suite → COSE/OSCORE table;
//! - [`keys`]: the §9 exporter labels and the Master Secret/Salt split;
//! - [`ext`]: the §11 `oscore_connection_id` and `cose_ext` extensions and the IDs they yield;
//! - [`records`]: TLS/DTLS record framing;
//! - [`inspect`]: what a middlebox can read from an ATLS payload without keys.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Peer bytes are hostile: outside tests, no panicking index, unwrap or overflow.
#![cfg_attr(
    not(test),
    warn(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod config;
pub mod engine;
pub mod error;
pub mod ext;
pub mod inspect;
pub mod keys;
pub mod pair;
pub mod records;
pub mod session;
pub mod suites;

pub use config::{
    Certificate, CertifiedKey, ClientConfig, ClientSessionParams, CommonConfig, DtlsConfig, Limits,
    PrivateKey, Psk, ServerConfig, ServerSessionParams, TlsVersion,
};
pub use engine::{
    Capabilities, ClientEndpoint, Engine, HandshakeInfo, PeerIdentity, ServerEndpoint, TlsSession,
};
pub use error::{Alert, Error, FlightError};
pub use ext::{ConnectionId, ExtensionConfig, IdSource, NegotiatedCids, ProtectionIds, ProtectionKind};
pub use keys::{AtlsKeys, SecretBytes, LABEL_COSE, LABEL_GENERIC, LABEL_OSCORE};
pub use records::Framing;
pub use session::{Role, Session};
pub use suites::{AlgorithmMapping, CipherSuite, CoseAead, HkdfHash};
