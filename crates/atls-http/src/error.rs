//! Errors of the HTTP binding, each naming the layer that failed.

use atls_core::Alert;
use atls_oscore::OscoreError;
use http::StatusCode;

/// A malformed message inside or around the protection layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The CSPRNG failed.
    #[error("random number generator: {0}")]
    Random(String),
    /// An HTTP/1.1 message carried in TLS records is malformed.
    #[error("HTTP/1.1 message inside TLS: {0}")]
    Http1(&'static str),
    /// A body exceeds its limit.
    #[error("message too large")]
    TooLarge,
}

/// Server options that cannot be used (a cookie name that is not a token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ATLS server options: {0}")]
pub struct InvalidOptions(pub String);

/// Where a client request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The HTTP connection carrying ATLS (TCP, transport TLS, proxies).
    Transport,
    /// The ATLS handshake (TLS inside HTTP bodies).
    Handshake,
    /// Record, OSCORE or COSE protection of application messages.
    Protection,
    /// The inner application.
    Application,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layer::Transport => "transport",
            Layer::Handshake => "ATLS handshake",
            Layer::Protection => "protection",
            Layer::Application => "application",
        })
    }
}

/// `": message"`, or nothing for an empty message (no dangling colon).
fn colon(message: &str) -> String {
    if message.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", message.trim())
    }
}

/// Why an [`crate::AtlsClient`] request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The outer HTTP exchange failed: connection, transport TLS, proxy, timeout.
    #[error("transport: {0}")]
    Transport(String),
    /// The outer HTTP server answered a status ATLS does not expect.
    #[error("transport: the server answered {status}{}", colon(message))]
    UnexpectedStatus {
        /// The outer status.
        status: StatusCode,
        /// The start of the body, for diagnosis.
        message: String,
    },
    /// The TLS handshake failed on this side (verification, protocol).
    #[error("ATLS handshake: {0}")]
    Handshake(#[from] atls_core::Error),
    /// The server refused the handshake; `alert` is the TLS alert it sent.
    #[error("ATLS handshake refused by the server ({status}){}", alert.map(|a| format!(": alert {a}")).unwrap_or_default())]
    HandshakeRefused {
        /// The outer status.
        status: StatusCode,
        /// The server's TLS alert, if its body carried one.
        alert: Option<Alert>,
    },
    /// A protected message failed verification or encoding.
    #[error("protection: {0}")]
    Protection(#[from] OscoreError),
    /// The server could not verify our protected request.
    #[error(
        "protection: the server refused the protected request ({status}){}",
        colon(message)
    )]
    ProtectionRefused {
        /// The outer status.
        status: StatusCode,
        /// The server's diagnostic.
        message: String,
    },
    /// A malformed inner message.
    #[error("protection: {0}")]
    Wire(#[from] WireError),
    /// The server no longer knows the session (an outer 404) and the
    /// request was not sent again, because its method is not idempotent
    /// (RFC 9110 §9.2.2): a middlebox may have swallowed a real answer, so
    /// the server may have acted on it. The next request starts a new
    /// session; the caller decides whether to repeat this one.
    #[error("transport: the server lost the ATLS session ({status}); the {method} request was not sent again (not idempotent)")]
    SessionLost {
        /// The request's method.
        method: http::Method,
        /// The outer status.
        status: StatusCode,
    },
    /// The server refused the request body as larger than its limit (413).
    #[error("the server refused the request as too large ({status}){}", colon(message))]
    RequestTooLarge {
        /// The outer status.
        status: StatusCode,
        /// The server's diagnostic, which names its limit.
        message: String,
    },
    /// The response body is larger than [`crate::ClientOptions::max_response`].
    #[error("application: the response body exceeds this client's limit of {limit} bytes")]
    ResponseTooLarge {
        /// The client's limit.
        limit: usize,
    },
    /// Invalid request or configuration given by the caller.
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    /// The layer that failed.
    pub fn layer(&self) -> Layer {
        match self {
            Self::Transport(_)
            | Self::UnexpectedStatus { .. }
            | Self::Invalid(_)
            | Self::SessionLost { .. } => Layer::Transport,
            Self::Handshake(_) | Self::HandshakeRefused { .. } => Layer::Handshake,
            Self::Protection(_)
            | Self::ProtectionRefused { .. }
            | Self::Wire(_)
            | Self::RequestTooLarge { .. } => Layer::Protection,
            Self::ResponseTooLarge { .. } => Layer::Application,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_body_leaves_no_dangling_colon() {
        let empty = ClientError::UnexpectedStatus {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: String::new(),
        };
        assert_eq!(
            empty.to_string(),
            "transport: the server answered 500 Internal Server Error"
        );
        let said = ClientError::UnexpectedStatus {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: " boom \n".into(),
        };
        assert_eq!(
            said.to_string(),
            "transport: the server answered 500 Internal Server Error: boom"
        );
    }
}
