//! OSCORE (RFC 8613) and a COSE_Encrypt0 profile, keyed from the ATLS export
//! (draft-friel-tls-atls §9).
//!
//! Pure functions over bytes plus a sequence-number store trait: no sockets,
//! no clock. A [`SecurityContext`] is derived from [`ContextParams`] (built
//! from an ATLS session with [`ContextParams::from_atls`]); messages are
//! protected and verified with the functions of [`message`] (CoAP), [`http`]
//! (the RFC 8613 §11 HTTP mapping) and [`cose`] (the COSE profile).
//!
//! Hand-written, because no crate provides it: the OSCORE context derivation,
//! option codec, nonce and AAD construction, message processing and replay
//! window. CoAP encoding uses `coap-lite`, COSE structures `coset`, CBOR
//! `ciborium`, the AEADs and HKDF RustCrypto.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod context;
pub mod cose;
mod crypto;
pub mod error;
pub mod http;
pub mod message;
pub mod option;
pub mod store;

pub use context::{ContextParams, ReplayWindow, SecurityContext};
pub use error::OscoreError;
pub use message::{
    error_response, oscore_option, protect_echo_challenge, protect_request, protect_response,
    unprotect_request, unprotect_response, RequestBinding,
};
pub use option::OscoreOption;
pub use store::{MemoryStore, RedbStore, SequenceStore};
