//! Every size limit of ATLS over HTTP, derived in one place.
//!
//! Users set three numbers: the largest inner request body the application
//! receives, the largest inner response body it may return, and the largest
//! handshake flight. Everything the transport reads or buffers follows from
//! them here, for the server ([`ServerLimits::derived`](crate::ServerLimits::derived))
//! and the client ([`ClientOptions::derived`](crate::ClientOptions::derived))
//! alike; docs/PROTOCOL.md §12 states the result.

use atls_core::Limits;

/// Room for the head of an inner message: the HTTP/1.1 request line and
/// header fields inside records, the inner CoAP code and options of OSCORE,
/// the COSE headers and tag. Also the largest HTTP/1.1 head accepted inside
/// records.
pub const HEAD_ALLOWANCE: usize = 16 * 1024;

/// Bytes of record headers and AEAD expansion a TLS stack may add to
/// `payload` bytes of application data (TLS 1.3 allows 256 bytes of
/// expansion per 2^14-byte record, plus the 5-byte header), and room for
/// the handshake messages that share a flight with it (a client Finished,
/// NewSessionTicket messages).
pub fn with_record_overhead(payload: usize) -> usize {
    let records = payload / 16384 + 1;
    payload
        .saturating_add(records.saturating_mul(256 + 5))
        .saturating_add(16 * 1024)
}

/// The limits a transport applies, derived from the few a user sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DerivedLimits {
    /// Largest inner request body handed to the application (all modes).
    pub max_request: usize,
    /// Largest inner response body (all modes).
    pub max_response: usize,
    /// Largest body of a POST that opens a session (a ClientHello, with
    /// 0-RTT data when the server accepts it).
    pub first_flight: usize,
    /// Largest inner message kept in memory (body limit plus head).
    pub inner_message: usize,
    /// Largest records-mode body a session reads: eight times the inner
    /// message (plus record overhead). It is streamed through the TLS
    /// session, keeping at most `inner_message` bytes of plaintext, so a
    /// message over its limit is answered (413 on a server,
    /// `ResponseTooLarge` on a client) with the session still in step.
    /// Beyond this the rest is not read, and the session's records channel
    /// ends.
    pub records_stream: usize,
    /// Largest OSCORE-mode body (ciphertext of the inner message).
    pub oscore_body: usize,
    /// Largest COSE-mode body.
    pub cose_body: usize,
    /// Bounds of the TLS session (flight length, buffered application data).
    pub tls: Limits,
    /// Largest OSCORE/COSE message the security contexts process.
    pub max_message: usize,
}

impl DerivedLimits {
    /// The limits of a side that receives inner messages of up to
    /// `receive` body bytes (requests on a server, responses on a client)
    /// and sends up to `send`, with handshake flights of up to `flight`
    /// bytes plus `early_data` 0-RTT bytes.
    pub(crate) fn new(
        (max_request, max_response): (usize, usize),
        receive: usize,
        send: usize,
        flight: usize,
        early_data: usize,
    ) -> Self {
        let inner = receive.saturating_add(HEAD_ALLOWANCE);
        let records_stream = with_record_overhead(inner.saturating_mul(8)).max(flight);
        // Pieces of a streamed body reach the session as they arrive; a
        // whole body in one piece is bounded by the first-flight read.
        let piece = with_record_overhead(inner.saturating_mul(2)).max(flight);
        let oscore_body = inner;
        let cose_body = receive.saturating_add(1024);
        Self {
            max_request,
            max_response,
            first_flight: flight.saturating_add(with_record_overhead(early_data)),
            inner_message: inner,
            records_stream,
            oscore_body,
            cose_body,
            tls: Limits {
                max_flight_len: piece,
                max_buffered_application_data: piece,
            },
            // The contexts protect what this side sends, too.
            max_message: oscore_body
                .max(cose_body)
                .max(send.saturating_add(HEAD_ALLOWANCE)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_covers_the_messages_it_carries() {
        let d = DerivedLimits::new((1 << 20, 4 << 20), 1 << 20, 4 << 20, 64 << 10, 16 << 10);
        assert!(d.records_stream >= 8 * ((1 << 20) + HEAD_ALLOWANCE));
        assert_eq!(d.inner_message, (1 << 20) + HEAD_ALLOWANCE);
        assert!(d.oscore_body > 1 << 20 && d.cose_body > 1 << 20);
        assert!(d.max_message >= d.oscore_body && d.max_message >= d.cose_body);
        assert!(d.max_message > 4 << 20, "a 4 MiB response can be protected");
        assert!(d.tls.max_flight_len >= d.first_flight);
        assert!(d.first_flight >= (64 << 10) + (16 << 10));
        // A full 4 MiB answer in records fits the record count bound.
        assert!(atls_core::records::max_records(with_record_overhead(4 << 20)) >= (4 << 20) / 16384 + 2);
    }
}
