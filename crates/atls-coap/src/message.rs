//! Strict checks of a CoAP message (RFC 7252 §3) that the codec does not
//! make: coap-lite accepts a payload marker with no payload, for one. A
//! message that fails them is a message format error and is dropped.

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
