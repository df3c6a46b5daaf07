//! ATLS over CoAP (draft-friel-tls-atls §7; RFC 7252, RFC 7959, RFC 8613).
//!
//! - [`server`]: [`CoapServer`], a datagram-in, datagram-out core: flights
//!   in `POST /.well-known/atls` with the ATLS Content-Format (65000 by
//!   default, from the experimental range: IANA has assigned none), Block1
//!   and Block2 when a flight does not fit one message, sessions in the
//!   shared `atls-sessions` table keyed by the client endpoint and the §11
//!   CIDs, then OSCORE requests to the built-in resources.
//! - [`udp`]: CoAP over UDP: the server loop, confirmable exchanges with
//!   retransmission and separate responses.
//! - [`tcp`]: CoAP over TCP (RFC 8323): framing, CSM, the server loop.
//! - [`client`]: [`AtlsCoapClient`], the handshake and OSCORE requests.
//! - [`block`]: bounded blockwise transfer.
//!
//! Also: Echo address validation (no state for, and at most three times the
//! bytes to, an unvalidated endpoint), blockwise inside OSCORE, DTLS 1.2 as
//! the ATLS layer ([`CoapServer::with_dtls`]). Not yet: CoAP over DTLS as
//! the transport, records mode over CoAP (docs/PROTOCOL.md §13).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod block;
pub mod client;
pub mod dtls;
pub mod echo;
pub mod handler;
pub mod inner;
pub mod message;
pub mod multipart;
pub mod server;
pub mod tcp;
pub mod udp;

pub use client::{inner_request, AtlsCoapClient, CoapClientError, CoapClientOptions, CoapMode, FlightTrip};
pub use dtls::DtlsServerConfig;
pub use server::{CoapConfig, CoapServer, Transport, CONTENT_FORMAT_ATLS};
