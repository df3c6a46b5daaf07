//! OSCORE/COSE errors and the CoAP error responses RFC 8613 §8 assigns them.

/// What went wrong while protecting or verifying a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OscoreError {
    /// The message carries no OSCORE option (it is not OSCORE-protected).
    #[error("the message is not OSCORE-protected")]
    NotProtected,
    /// The OSCORE option or the COSE object cannot be decoded (RFC 8613 §6.1, §8.2 step 2).
    #[error("failed to decode COSE: {0}")]
    Decode(&'static str),
    /// No security context for the kid (and kid context) received.
    #[error("security context not found")]
    ContextNotFound,
    /// The Partial IV was seen before or lies left of the replay window (§7.4).
    #[error("replay detected")]
    Replay,
    /// AEAD verification failed: wrong key, tampered message (§8.2 step 6).
    #[error("decryption failed")]
    Decryption,
    /// The replay window is not initialised (after a restart): the request
    /// must be repeated with the Echo value of a 4.01 challenge (App. B.1.2).
    #[error("freshness not verified: repeat the request with the Echo option")]
    FreshnessRequired,
    /// The sender's sequence numbers are used up (2^40): derive a new context.
    #[error("sender sequence numbers exhausted; a new security context is needed")]
    SequenceExhausted,
    /// The (inner or outer) CoAP message cannot be encoded or decoded.
    #[error("CoAP message: {0}")]
    Coap(String),
    /// An algorithm outside the ATLS §10 table.
    #[error("unsupported algorithm: {0}")]
    Unsupported(String),
    /// The durable sequence-number store failed; nothing was sent.
    #[error("sequence number store: {0}")]
    Store(String),
    /// The context parameters are not a valid security context (RFC 8613
    /// §3.3), e.g. the Sender ID equals the Recipient ID.
    #[error("invalid security context: {0}")]
    InvalidContext(&'static str),
}

/// A CoAP error response code as (class, detail), e.g. (4, 1) for 4.01.
pub type CoapCode = (u8, u8);

impl OscoreError {
    /// The error response a server sends for this error, with its RFC 8613
    /// diagnostic payload; `None` when the error is not a peer's fault.
    pub fn coap_error(&self) -> Option<(CoapCode, &'static str)> {
        match self {
            Self::Decode(_) | Self::NotProtected => Some(((4, 2), "Failed to decode COSE")),
            Self::ContextNotFound => Some(((4, 1), "Security context not found")),
            Self::Replay => Some(((4, 1), "Replay detected")),
            Self::Decryption => Some(((4, 0), "Decryption failed")),
            Self::FreshnessRequired => Some(((4, 1), "Echo required")),
            _ => None,
        }
    }
}
