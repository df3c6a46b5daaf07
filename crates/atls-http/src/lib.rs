//! ATLS over HTTP (draft-friel-tls-atls §5.1, §8, Appendix B; RFC 8613 §11).
//!
//! - [`server`]: [`AtlsLayer`], a tower layer that terminates ATLS in front of
//!   any axum/tower application: it serves `POST /.well-known/atls`, keeps
//!   the bounded session table, and removes record, OSCORE or COSE
//!   protection so the application sees plaintext requests carrying an
//!   [`AtlsPeer`] extension.
//! - [`client`]: [`AtlsClient`], one API for the three modes, with lazy
//!   handshakes, session reuse, resumption and 0-RTT.
//! - [`wire`]: the fixed wire behaviour (paths, media types, cookie, the
//!   HTTP/1.1 messages carried in record mode).
//!
//! The TLS work happens in the sans-IO `atls-core` session; this crate only
//! moves its flights through HTTP.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod client;
pub mod error;
pub mod limits;
pub mod server;
pub mod wire;

pub use atls_sessions::TableStats;
pub use client::{AtlsClient, ClientOptions, Exchange, TransportTls, WireEvent};
pub use error::{ClientError, InvalidOptions, Layer, WireError};
pub use limits::DerivedLimits;
pub use server::{AtlsLayer, AtlsPeer, AtlsServer, AtlsService, PeerSummary, ServerLimits, ServerOptions};
pub use wire::Mode;
