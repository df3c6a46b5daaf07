//! The server side of ATLS that does not depend on the transport.
//!
//! An ATLS server, whether it carries flights in HTTP bodies or CoAP
//! payloads, keeps a table of sessions: each is a TLS engine session that is
//! either still handshaking (*half-open*) or *established* with the OSCORE
//! and COSE contexts exported from it. This crate holds that table and its
//! admission policy, so that the HTTP terminator, the CoAP server and the
//! gateway share one answer to "who may hold state here, and for how long":
//!
//! - [`SessionTable`]: bounded sessions keyed by a random [`SessionId`] (the
//!   HTTP cookie) and by the server's connection IDs (the OSCORE/COSE kids);
//!   expiry and least-recently-used order in ordered structures, so no request
//!   scans the table; engine work never runs under the table lock.
//! - [`Policy`]: the bounds, the per-client cap on handshakes and when an
//!   established session may give its place to a newcomer.
//! - [`ServerSession`]: one session's TLS state and, once established, its
//!   exported contexts.
//!
//! Like `atls-core`, nothing here reads a clock or does IO: callers pass
//! `now`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod id;
mod server_session;
mod table;

pub use id::{ClientKey, SessionId, SESSION_ID_LEN};
pub use server_session::{Established, FlightFailure, Progress, ServerSession};
pub use table::{
    Admission, Counters, Eviction, Found, KidKind, Phase, Policy, Refusal, SessionTable, TableStats,
};
