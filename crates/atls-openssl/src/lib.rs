//! The OpenSSL engine for ATLS.
//!
//! Runs TLS 1.2, TLS 1.3 and DTLS 1.2 from the system libssl over in-memory
//! buffers: certificate authentication (one-way and mutual), external PSK
//! (including the RFC 7925 CCM_8 suites), resumption, TLS 1.3 0-RTT, and the
//! draft's `oscore_connection_id` and `cose_ext` extensions.
//!
//! Use it through [`atls_core::Engine`]: `OpenSslEngine.client(&config)` and
//! `OpenSslEngine.server(&config)` return endpoints whose sessions the
//! engine-neutral [`atls_core::Session`] drives. No OpenSSL type crosses this
//! crate's public API.
//!
//! # DTLS timers
//! OpenSSL 3.0 keeps its DTLS retransmission timer on the system clock. The
//! engine sets the timer's schedule through `DTLS_set_timer_cb` (initial
//! timeout and cap from [`atls_core::DtlsConfig`], doubling in between) and
//! reports OpenSSL's remaining time, which the core turns into a deadline on
//! the caller's clock. This is the one `unsafe` corner of the workspace, in
//! the private `sys` module.
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod context;
mod session;
mod sys;

pub use context::OpenSslEngine;
