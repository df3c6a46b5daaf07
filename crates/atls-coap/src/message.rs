//! Strict checks of a CoAP message (RFC 7252 §3) that the codec does not
//! make: coap-lite accepts a payload marker with no payload, for one. A
//! message that fails them is a message format error and is dropped.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};

/// Why a message is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than its header, token or an option says.
    #[error("truncated CoAP message")]
    Truncated,
    /// Token length 9–15.
    #[error("token longer than 8 bytes")]
    Token,
    /// An option delta or length nibble of 15 that is not the payload marker.
    #[error("reserved option nibble")]
    Reserved,
    /// A payload marker with nothing after it.
    #[error("payload marker without a payload")]
    EmptyPayload,
    /// Not CoAP version 1.
    #[error("not CoAP version 1")]
    Version,
}

/// Validate the encoding of a UDP CoAP message.
pub fn validate(bytes: &[u8]) -> Result<(), FormatError> {
    let first = *bytes.first().ok_or(FormatError::Truncated)?;
    if first >> 6 != 1 {
        return Err(FormatError::Version);
    }
    let tkl = usize::from(first & 0x0F);
    if tkl > 8 {
        return Err(FormatError::Token);
    }
    let mut at = 4usize.checked_add(tkl).ok_or(FormatError::Truncated)?;
    if bytes.len() < at {
        return Err(FormatError::Truncated);
    }
    while let Some(&byte) = bytes.get(at) {
        at += 1;
        if byte == 0xFF {
            return if at < bytes.len() {
                Ok(())
            } else {
                Err(FormatError::EmptyPayload)
            };
        }
        let mut nibble = |n: u8| -> Result<usize, FormatError> {
            Ok(match n {
                0..=12 => usize::from(n),
                13 => {
                    let v = *bytes.get(at).ok_or(FormatError::Truncated)?;
                    at += 1;
                    usize::from(v) + 13
                }
                14 => {
                    let hi = *bytes.get(at).ok_or(FormatError::Truncated)?;
                    let lo = *bytes.get(at + 1).ok_or(FormatError::Truncated)?;
                    at += 2;
                    usize::from(u16::from_be_bytes([hi, lo])) + 269
                }
                _ => return Err(FormatError::Reserved),
            })
        };
        let _delta = nibble(byte >> 4)?;
        let length = nibble(byte & 0x0F)?;
        at = at.checked_add(length).ok_or(FormatError::Truncated)?;
        if at > bytes.len() {
            return Err(FormatError::Truncated);
        }
    }
    Ok(())
}

/// Option numbers this server understands; an unknown critical (odd)
/// option in a request is answered 4.02 Bad Option (RFC 7252 §5.4.1).
const KNOWN: &[u16] = &[
    1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15, 17, 20, 23, 27, 28, 35, 39, 60, 252, 258, 292,
];

/// The first critical option of `packet` this server does not know.
pub fn unknown_critical(packet: &coap_lite::Packet) -> Option<u16> {
    packet
        .options()
        .map(|(number, _)| *number)
        .find(|n| n % 2 == 1 && !KNOWN.contains(n))
}

/// A datagram as a request: `None` to drop it (malformed, or not a
/// confirmable or non-confirmable request), `Err` with the Reset that
/// answers a CoAP ping.
pub fn parse_request(datagram: &[u8]) -> Option<Result<Packet, Vec<u8>>> {
    validate(datagram).ok()?;
    let request = Packet::from_bytes(datagram).ok()?;
    if let Some(pong) = ping_reset(&request) {
        return Some(Err(pong));
    }
    let is_request = matches!(request.header.code, MessageClass::Request(_))
        && matches!(
            request.header.get_type(),
            MessageType::Confirmable | MessageType::NonConfirmable
        );
    is_request.then_some(Ok(request))
}

/// CoAP ping (RFC 7252 §4.3): an empty Confirmable message is answered
/// with a Reset of its message ID (4 bytes: never an amplification).
pub fn ping_reset(request: &Packet) -> Option<Vec<u8>> {
    if request.header.code != MessageClass::Empty || request.header.get_type() != MessageType::Confirmable {
        return None;
    }
    let mut reset = Packet::new();
    reset.header.code = MessageClass::Empty;
    reset.header.set_type(MessageType::Reset);
    reset.header.message_id = request.header.message_id;
    reset.to_bytes().ok()
}

/// An answer under construction: code, options, payload.
pub fn answer(request: &Packet, code: ResponseType) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(code);
    p.set_token(request.get_token().to_vec());
    match request.header.get_type() {
        MessageType::Confirmable => {
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = request.header.message_id;
        }
        _ => {
            p.header.set_type(MessageType::NonConfirmable);
            p.header.message_id = random_mid();
        }
    }
    p
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    random()
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let _ = getrandom::fill(&mut b);
    b
}

/// A random message ID.
pub fn random_mid() -> u16 {
    u16::from_be_bytes(random::<2>())
}

/// An answer with a diagnostic payload (RFC 7252 §5.5.2).
pub fn diagnostic(request: &Packet, code: ResponseType, text: &str) -> Packet {
    // (Diagnostic payloads are plain text, RFC 7252 §5.5.2.)
    let mut p = answer(request, code);
    p.payload = text.as_bytes().to_vec();
    p
}

/// A CoAP uint option value (RFC 7252 §3.2: minimal length).
pub fn uint_option(value: u64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes.get(skip..).unwrap_or_default().to_vec()
}

/// A CoAP uint option value read back (`None` beyond 8 bytes).
pub fn read_uint(bytes: &[u8]) -> Option<u64> {
    (bytes.len() <= 8).then(|| bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// Whether a request targets `/.well-known/atls`.
pub fn is_atls_path(request: &Packet) -> bool {
    let Some(path) = request.get_option(CoapOption::UriPath) else {
        return false;
    };
    path.len() == 2 && path.iter().map(Vec::as_slice).eq([&b".well-known"[..], b"atls"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_messages_are_found() {
        assert_eq!(validate(&[0x40, 0x01, 0, 1]), Ok(()));
        assert_eq!(validate(&[0x40, 0x01, 0]), Err(FormatError::Truncated));
        assert_eq!(validate(&[0x49, 0x01, 0, 1]), Err(FormatError::Token));
        assert_eq!(validate(&[0x80, 0x01, 0, 1]), Err(FormatError::Version));
        assert_eq!(
            validate(&[0x40, 0x02, 0, 1, 0xFF]),
            Err(FormatError::EmptyPayload)
        );
        assert_eq!(validate(&[0x40, 0x02, 0, 1, 0xFF, 7]), Ok(()));
        // Option delta 13 and 14 without their extension bytes; length 14 likewise.
        assert_eq!(validate(&[0x40, 0x02, 0, 1, 0xD0]), Err(FormatError::Truncated));
        assert_eq!(
            validate(&[0x40, 0x02, 0, 1, 0xE0, 0]),
            Err(FormatError::Truncated)
        );
        assert_eq!(
            validate(&[0x40, 0x02, 0, 1, 0x1E, 0]),
            Err(FormatError::Truncated)
        );
        assert_eq!(validate(&[0x40, 0x02, 0, 1, 0xF1]), Err(FormatError::Reserved));
        // An option value longer than the message.
        assert_eq!(
            validate(&[0x40, 0x02, 0, 1, 0xB5, b'a']),
            Err(FormatError::Truncated)
        );
    }
}
