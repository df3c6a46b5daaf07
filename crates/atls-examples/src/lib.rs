//! The project's example programs live in `examples/`; CI compiles them
//! (`cargo clippy --all-targets`) and `cargo run -p atls-examples
//! --example NAME` runs one:
//!
//! - `axum_service`: an axum application behind [`atls_http::AtlsLayer`];
//! - `client_modes`: one request in each protection mode against it;
//! - `oscore_device`: the sans-IO handshake of a device, then OSCORE from
//!   the ATLS export, with no network at all.
#![forbid(unsafe_code)]
