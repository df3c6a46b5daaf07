//! Record framing: splitting an ATLS payload into TLS or DTLS records.
//!
//! An ATLS payload (one HTTP body, one CoAP payload) carries one whole flight:
//! a concatenation of records. Both framings are self-delimiting, so the core
//! validates every header before any byte reaches a TLS engine, and a DTLS
//! engine receives one record per datagram.

use crate::error::FlightError;

/// The largest record body TLS allows: 2^14 plus 2048 bytes of expansion
/// (RFC 5246 §6.2.3; TLS 1.3 allows 2^14 + 256).
pub const MAX_RECORD_BODY: usize = 16384 + 2048;
/// Records a flight may always hold; a larger flight may hold one more
/// record per KiB (so that a 4 MiB body of full records fits, while a flight
/// of tiny records stays bounded): see [`max_records`].
pub const MAX_RECORDS_PER_FLIGHT: usize = 256;

/// The most records a payload of `len` bytes may hold.
pub fn max_records(len: usize) -> usize {
    MAX_RECORDS_PER_FLIGHT.max(len / 1024)
}

/// Length of a TLS record header.
pub const TLS_HEADER_LEN: usize = 5;
/// Length of a DTLS 1.0/1.2 record header.
pub const DTLS_HEADER_LEN: usize = 13;

/// Which record framing a payload uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Framing {
    /// TLS over a reliable transport (5-byte headers).
    Tls,
    /// DTLS 1.0/1.2 (13-byte headers with epoch and sequence number).
    Dtls,
}

/// TLS record content types (RFC 8446 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentType {
    /// change_cipher_spec(20)
    ChangeCipherSpec,
    /// alert(21)
    Alert,
    /// handshake(22)
    Handshake,
    /// application_data(23)
    ApplicationData,
    /// heartbeat(24)
    Heartbeat,
    /// tls12_cid(25), DTLS connection ID records (RFC 9146)
    Tls12Cid,
    /// ack(26), DTLS 1.3
    Ack,
}

impl ContentType {
    /// Decode a content type byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            20 => Self::ChangeCipherSpec,
            21 => Self::Alert,
            22 => Self::Handshake,
            23 => Self::ApplicationData,
            24 => Self::Heartbeat,
            25 => Self::Tls12Cid,
            26 => Self::Ack,
            _ => return None,
        })
    }

    /// The RFC name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChangeCipherSpec => "change_cipher_spec",
            Self::Alert => "alert",
            Self::Handshake => "handshake",
            Self::ApplicationData => "application_data",
            Self::Heartbeat => "heartbeat",
            Self::Tls12Cid => "tls12_cid",
            Self::Ack => "ack",
        }
    }
}

/// One record located inside a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Content type.
    pub content_type: ContentType,
    /// The record-layer version field.
    pub version: u16,
    /// DTLS epoch (0 for TLS).
    pub epoch: u16,
    /// DTLS 48-bit sequence number (0 for TLS).
    pub sequence: u64,
    /// Offset of the record header in the payload.
    pub offset: usize,
    /// The whole record: header and body.
    pub bytes: &'a [u8],
    /// The record body (fragment).
    pub body: &'a [u8],
}

/// Whether a version field fits a framing: TLS 1.0–1.3 use 0x0301..=0x0304
/// (0x0300 is accepted only as SSL 3 would appear in a hostile payload: it is rejected),
/// DTLS 1.0/1.2 use 0xFEFF/0xFEFD.
fn version_fits(framing: Framing, version: u16) -> bool {
    match framing {
        Framing::Tls => (0x0301..=0x0304).contains(&version),
        Framing::Dtls => version == 0xFEFF || version == 0xFEFD,
    }
}

/// Guess the framing of a payload from its first record header.
pub fn detect_framing(payload: &[u8]) -> Option<Framing> {
    let version = u16::from_be_bytes([*payload.get(1)?, *payload.get(2)?]);
    if version_fits(Framing::Dtls, version) {
        Some(Framing::Dtls)
    } else if (0x0300..=0x0304).contains(&version) {
        Some(Framing::Tls)
    } else {
        None
    }
}

/// Split a payload into records, validating every header.
pub fn split_records(framing: Framing, payload: &[u8]) -> Result<Vec<RecordRef<'_>>, FlightError> {
    if payload.is_empty() {
        return Err(FlightError::Empty);
    }
    let header_len = match framing {
        Framing::Tls => TLS_HEADER_LEN,
        Framing::Dtls => DTLS_HEADER_LEN,
    };
    let limit = max_records(payload.len());
    let mut records = Vec::new();
    let mut offset = 0usize;
    while offset < payload.len() {
        if records.len() >= limit {
            return Err(FlightError::TooManyRecords { limit });
        }
        let rest = payload.get(offset..).unwrap_or_default();
        let header = rest.get(..header_len).ok_or(FlightError::Truncated { offset })?;
        let (&type_byte, version_bytes) = header.split_first().ok_or(FlightError::Truncated { offset })?;
        let content_type = ContentType::from_u8(type_byte).ok_or(FlightError::UnknownContentType {
            offset,
            content_type: type_byte,
        })?;
        let be16 = |i: usize| -> u16 {
            u16::from_be_bytes([
                version_bytes.get(i).copied().unwrap_or(0),
                version_bytes.get(i.wrapping_add(1)).copied().unwrap_or(0),
            ])
        };
        let version = be16(0);
        if !version_fits(framing, version) {
            return Err(FlightError::BadVersion { offset, version });
        }
        let (epoch, sequence, length) = match framing {
            Framing::Tls => (0, 0, usize::from(be16(2))),
            Framing::Dtls => {
                let mut seq = 0u64;
                for byte in version_bytes.get(4..10).unwrap_or_default() {
                    seq = (seq << 8) | u64::from(*byte);
                }
                (be16(2), seq, usize::from(be16(10)))
            }
        };
        if length > MAX_RECORD_BODY {
            return Err(FlightError::RecordTooLong { offset, length });
        }
        let total = header_len.saturating_add(length);
        let bytes = rest.get(..total).ok_or(FlightError::Truncated { offset })?;
        let body = bytes.get(header_len..).unwrap_or_default();
        records.push(RecordRef {
            content_type,
            version,
            epoch,
            sequence,
            offset,
            bytes,
            body,
        });
        offset = offset.saturating_add(total);
    }
    Ok(records)
}

/// Bytes of the longest prefix of `buf` that is whole records (headers
/// validated as in [`split_records`]); the rest is a record still arriving.
/// For a transport that reads a long body in pieces and feeds each run of
/// whole records to a session as it arrives.
pub fn complete_records_len(framing: Framing, buf: &[u8]) -> Result<usize, FlightError> {
    complete_records_within(framing, buf, usize::MAX, usize::MAX)
}

/// Like [`complete_records_len`], but a prefix of at most `max_len` bytes
/// and `max_count` records (at least one whole record when one is there, so
/// that a caller feeding pieces always advances).
pub fn complete_records_within(
    framing: Framing,
    buf: &[u8],
    max_len: usize,
    max_count: usize,
) -> Result<usize, FlightError> {
    let header_len = match framing {
        Framing::Tls => TLS_HEADER_LEN,
        Framing::Dtls => DTLS_HEADER_LEN,
    };
    let mut offset = 0usize;
    let mut count = 0usize;
    loop {
        let rest = buf.get(offset..).unwrap_or_default();
        let Some(header) = rest.get(..header_len) else {
            return Ok(offset);
        };
        let type_byte = header.first().copied().unwrap_or_default();
        if ContentType::from_u8(type_byte).is_none() {
            return Err(FlightError::UnknownContentType {
                offset,
                content_type: type_byte,
            });
        }
        let be16 = |at: usize| match header.get(at..at.saturating_add(2)) {
            Some(&[a, b]) => u16::from_be_bytes([a, b]),
            _ => 0,
        };
        let version = be16(1);
        if !version_fits(framing, version) {
            return Err(FlightError::BadVersion { offset, version });
        }
        let length = usize::from(be16(header_len.saturating_sub(2)));
        if length > MAX_RECORD_BODY {
            return Err(FlightError::RecordTooLong { offset, length });
        }
        let total = header_len.saturating_add(length);
        let end = offset.saturating_add(total);
        if rest.len() < total || (count > 0 && (end > max_len || count >= max_count)) {
            return Ok(offset);
        }
        offset = end;
        count = count.saturating_add(1);
    }
}

/// How a whole payload that might open a session begins: its records'
/// headers are validated (any number of records), and only the leading
/// ones are read for [`first_flight`].
pub fn classify_payload(framing: Framing, payload: &[u8]) -> Result<FirstFlight, FlightError> {
    if payload.is_empty() {
        return Err(FlightError::Empty);
    }
    let whole = complete_records_len(framing, payload)?;
    if whole != payload.len() {
        return Err(FlightError::Truncated { offset: whole });
    }
    let leading = complete_records_within(framing, payload, usize::MAX, MAX_RECORDS_PER_FLIGHT)?;
    let records = split_records(framing, payload.get(..leading).unwrap_or_default())?;
    Ok(first_flight(framing, &records))
}

/// How a payload that would open a session begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstFlight {
    /// A complete ClientHello message in cleartext handshake records (epoch 0).
    ClientHello,
    /// A ClientHello whose message is cut short: more bytes than the payload
    /// holds are announced. No TLS stack answers it, so it cannot open a session.
    IncompleteClientHello,
    /// Anything else: records of an established session, a stray handshake
    /// message, an alert.
    Other,
}

/// Whether `records` (one payload, split by [`split_records`]) start with a
/// complete ClientHello: the check a server runs before it spends a session
/// on a payload that arrives without one. It reads only the cleartext
/// handshake headers (RFC 8446 §4, RFC 6347 §4.2.2); the TLS stack still
/// judges the message itself.
pub fn first_flight(framing: Framing, records: &[RecordRef<'_>]) -> FirstFlight {
    let leading = records
        .iter()
        .take_while(|r| r.content_type == ContentType::Handshake && r.epoch == 0);
    match framing {
        Framing::Tls => {
            // Handshake messages may span records: read the leading header.
            let mut header = [0u8; 4];
            let mut have = 0usize;
            let mut total = 0usize;
            for record in leading {
                for byte in record.body {
                    if let Some(slot) = header.get_mut(have) {
                        *slot = *byte;
                        have = have.saturating_add(1);
                    }
                }
                total = total.saturating_add(record.body.len());
            }
            if have < header.len() {
                return match (have, header.first()) {
                    (0, _) => FirstFlight::Other,
                    (_, Some(1)) => FirstFlight::IncompleteClientHello,
                    _ => FirstFlight::Other,
                };
            }
            let [kind, a, b, c] = header;
            if kind != 1 {
                return FirstFlight::Other;
            }
            let length = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if total >= length.saturating_add(4) {
                FirstFlight::ClientHello
            } else {
                FirstFlight::IncompleteClientHello
            }
        }
        Framing::Dtls => dtls_first_flight(leading),
    }
}

/// DTLS: handshake fragments (12-byte headers) of message_seq 0 of the first
/// message, which must be a ClientHello, must cover its whole length.
fn dtls_first_flight<'a>(records: impl Iterator<Item = &'a RecordRef<'a>>) -> FirstFlight {
    let mut length = None;
    let mut fragments: Vec<(usize, usize)> = Vec::new();
    for record in records {
        let mut body = record.body;
        while let Some(header) = body.get(..12) {
            let be24 = |i: usize| -> usize {
                header
                    .get(i..i.saturating_add(3))
                    .map_or(0, |b| b.iter().fold(0usize, |acc, x| acc << 8 | usize::from(*x)))
            };
            let (kind, msg_len, seq) = (header.first().copied(), be24(1), be24(4) >> 8);
            let (offset, frag_len) = (be24(6), be24(9));
            if kind != Some(1) {
                return if length.is_none() && fragments.is_empty() {
                    FirstFlight::Other
                } else {
                    FirstFlight::IncompleteClientHello
                };
            }
            if *length.get_or_insert(msg_len) != msg_len || seq > 1 {
                return FirstFlight::Other;
            }
            fragments.push((offset, offset.saturating_add(frag_len)));
            body = body.get(12usize.saturating_add(frag_len)..).unwrap_or_default();
        }
    }
    let Some(length) = length else {
        return FirstFlight::Other;
    };
    fragments.sort_unstable();
    let mut covered = 0usize;
    for (start, end) in fragments {
        if start > covered {
            break;
        }
        covered = covered.max(end);
    }
    if covered >= length {
        FirstFlight::ClientHello
    } else {
        FirstFlight::IncompleteClientHello
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_concatenated_tls_records() {
        let payload = [22, 3, 3, 0, 2, 1, 2, 20, 3, 3, 0, 1, 1];
        let records = split_records(Framing::Tls, &payload).expect("valid");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].content_type, ContentType::Handshake);
        assert_eq!(records[0].body, &[1, 2]);
        assert_eq!(records[1].content_type, ContentType::ChangeCipherSpec);
        assert_eq!(records[1].offset, 7);
    }

    #[test]
    fn splits_dtls_records_with_epoch_and_sequence() {
        let payload = [22, 0xFE, 0xFD, 0, 1, 0, 0, 0, 0, 0, 7, 0, 1, 9];
        let records = split_records(Framing::Dtls, &payload).expect("valid");
        assert_eq!(records[0].epoch, 1);
        assert_eq!(records[0].sequence, 7);
        assert_eq!(records[0].body, &[9]);
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        assert_eq!(split_records(Framing::Tls, &[]), Err(FlightError::Empty));
        assert_eq!(
            split_records(Framing::Tls, &[22, 3, 3, 0, 5, 1]),
            Err(FlightError::Truncated { offset: 0 })
        );
        assert_eq!(
            split_records(Framing::Tls, &[99, 3, 3, 0, 0]),
            Err(FlightError::UnknownContentType {
                offset: 0,
                content_type: 99
            })
        );
        assert_eq!(
            split_records(Framing::Tls, &[22, 0xFE, 0xFD, 0, 0]),
            Err(FlightError::BadVersion {
                offset: 0,
                version: 0xFEFD
            })
        );
        assert_eq!(
            split_records(Framing::Tls, &[23, 3, 3, 0xFF, 0xFF]),
            Err(FlightError::RecordTooLong {
                offset: 0,
                length: 0xFFFF
            })
        );
    }

    #[test]
    fn detects_framing() {
        assert_eq!(detect_framing(&[22, 3, 1]), Some(Framing::Tls));
        assert_eq!(detect_framing(&[22, 0xFE, 0xFD]), Some(Framing::Dtls));
        assert_eq!(detect_framing(&[22, 9, 9]), None);
        assert_eq!(detect_framing(&[22]), None);
    }

    #[test]
    fn recognises_a_complete_client_hello() {
        let check = |payload: &[u8]| {
            first_flight(
                Framing::Tls,
                &split_records(Framing::Tls, payload).expect("records"),
            )
        };
        // A 2-byte ClientHello body in one record, then split over two records.
        assert_eq!(
            check(&[22, 3, 1, 0, 6, 1, 0, 0, 2, 9, 9]),
            FirstFlight::ClientHello
        );
        assert_eq!(
            check(&[22, 3, 1, 0, 3, 1, 0, 0, 22, 3, 1, 0, 3, 2, 9, 9]),
            FirstFlight::ClientHello
        );
        // Announces more than it carries; a one-byte handshake record.
        assert_eq!(
            check(&[22, 3, 1, 0, 5, 1, 0, 0, 9, 9]),
            FirstFlight::IncompleteClientHello
        );
        assert_eq!(check(&[22, 3, 1, 0, 1, 1]), FirstFlight::IncompleteClientHello);
        assert_eq!(check(&[22, 3, 1, 0, 1, 0]), FirstFlight::Other);
        // Another handshake message, application data, an alert.
        assert_eq!(check(&[22, 3, 3, 0, 4, 2, 0, 0, 0]), FirstFlight::Other);
        assert_eq!(check(&[23, 3, 3, 0, 1, 0]), FirstFlight::Other);
        assert_eq!(check(&[21, 3, 3, 0, 2, 2, 40]), FirstFlight::Other);
    }

    #[test]
    fn recognises_a_complete_dtls_client_hello() {
        let record = |body: &[u8]| {
            let mut r = vec![22, 0xFE, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0];
            r.extend_from_slice(&(body.len() as u16).to_be_bytes());
            r.extend_from_slice(body);
            r
        };
        let fragment = |offset: u8, len: u8| {
            let mut f = vec![1, 0, 0, 4, 0, 0, 0, 0, offset, 0, 0, len];
            f.extend(std::iter::repeat_n(7, usize::from(len)));
            f
        };
        let check = |payload: &[u8]| {
            first_flight(
                Framing::Dtls,
                &split_records(Framing::Dtls, payload).expect("records"),
            )
        };
        assert_eq!(check(&record(&fragment(0, 4))), FirstFlight::ClientHello);
        let mut two = record(&fragment(2, 2));
        two.extend(record(&fragment(0, 2)));
        assert_eq!(check(&two), FirstFlight::ClientHello);
        assert_eq!(
            check(&record(&fragment(0, 3))),
            FirstFlight::IncompleteClientHello
        );
        assert_eq!(
            check(&record(&fragment(1, 3))),
            FirstFlight::IncompleteClientHello
        );
        assert_eq!(
            check(&record(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
            FirstFlight::Other
        );
    }

    #[test]
    fn larger_flights_may_hold_more_records() {
        assert_eq!(max_records(0), MAX_RECORDS_PER_FLIGHT);
        assert_eq!(max_records(4 * 1024 * 1024), 4096);
        let tiny = [23u8, 3, 3, 0, 0].repeat(MAX_RECORDS_PER_FLIGHT + 1);
        assert!(matches!(
            split_records(Framing::Tls, &tiny),
            Err(FlightError::TooManyRecords { .. })
        ));
    }

    #[test]
    fn whole_records_are_found_in_a_body_that_arrives_in_pieces() {
        let two = [22, 3, 3, 0, 2, 1, 2, 23, 3, 3, 0, 1, 9];
        for cut in 0..=two.len() {
            let expected = match cut {
                0..=6 => 0,
                7..=12 => 7,
                _ => 13,
            };
            assert_eq!(
                complete_records_len(Framing::Tls, &two[..cut]),
                Ok(expected),
                "{cut}"
            );
        }
        assert!(matches!(
            complete_records_len(Framing::Tls, &[22, 3, 3, 0, 1, 0, 99, 3, 3, 0, 0]),
            Err(FlightError::UnknownContentType { offset: 6, .. })
        ));
        assert!(matches!(
            complete_records_len(Framing::Tls, &[23, 3, 3, 0xFF, 0xFF]),
            Err(FlightError::RecordTooLong { .. })
        ));
        assert_eq!(
            complete_records_len(Framing::Dtls, &[22, 0xFE, 0xFD, 0, 1, 0, 0, 0, 0, 0, 7, 0, 1, 9]),
            Ok(14)
        );
    }

    #[test]
    fn pieces_of_whole_records_stay_within_their_bounds() {
        let record = [23u8, 3, 3, 0, 3, 1, 2, 3];
        let five = record.repeat(5);
        assert_eq!(
            complete_records_within(Framing::Tls, &five, 16, usize::MAX),
            Ok(16)
        );
        assert_eq!(
            complete_records_within(Framing::Tls, &five, usize::MAX, 3),
            Ok(24)
        );
        // Always at least one whole record.
        assert_eq!(complete_records_within(Framing::Tls, &five, 1, 0), Ok(8));
        // Many small records: a valid payload, classified without a count limit.
        let many = record.repeat(MAX_RECORDS_PER_FLIGHT + 50);
        assert_eq!(classify_payload(Framing::Tls, &many), Ok(FirstFlight::Other));
        assert!(classify_payload(Framing::Tls, &many[..many.len() - 1]).is_err());
    }
}
