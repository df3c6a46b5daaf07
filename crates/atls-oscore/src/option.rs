//! The OSCORE option value (RFC 8613 §6.1).

use crate::error::OscoreError;

/// Largest Partial IV: 5 bytes (sequence numbers stay below 2^40).
pub const MAX_PIV_LEN: usize = 5;

/// The decoded OSCORE option.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OscoreOption {
    /// Partial IV, minimal big-endian (absent in most responses).
    pub partial_iv: Option<Vec<u8>>,
    /// kid context, when present.
    pub kid_context: Option<Vec<u8>>,
    /// kid (Sender ID of the sender), when present.
    pub kid: Option<Vec<u8>>,
}

impl OscoreOption {
    /// Encode; an option with nothing in it encodes as the empty value.
    pub fn encode(&self) -> Result<Vec<u8>, OscoreError> {
        let piv = self.partial_iv.as_deref().unwrap_or_default();
        if piv.len() > MAX_PIV_LEN {
            return Err(OscoreError::Decode("Partial IV longer than 5 bytes"));
        }
        let mut flags = u8::try_from(piv.len()).unwrap_or(0);
        if self.kid.is_some() {
            flags |= 0x08;
        }
        if self.kid_context.is_some() {
            flags |= 0x10;
        }
        if flags == 0 {
            return Ok(Vec::new());
        }
        let mut out = vec![flags];
        out.extend_from_slice(piv);
        if let Some(ctx) = &self.kid_context {
            let len =
                u8::try_from(ctx.len()).map_err(|_| OscoreError::Decode("kid context over 255 bytes"))?;
            out.push(len);
            out.extend_from_slice(ctx);
        }
        if let Some(kid) = &self.kid {
            out.extend_from_slice(kid);
        }
        Ok(out)
    }

    /// Decode, rejecting reserved bits, reserved PIV lengths and truncation.
    pub fn decode(value: &[u8]) -> Result<Self, OscoreError> {
        let fields = OptionRef::parse(value)?;
        Ok(Self {
            partial_iv: fields.partial_iv.map(<[u8]>::to_vec),
            kid_context: fields.kid_context.map(<[u8]>::to_vec),
            kid: fields.kid.map(<[u8]>::to_vec),
        })
    }
}

/// The fields of an OSCORE option, borrowed from the option value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionRef<'a> {
    /// Partial IV.
    pub partial_iv: Option<&'a [u8]>,
    /// kid context.
    pub kid_context: Option<&'a [u8]>,
    /// kid.
    pub kid: Option<&'a [u8]>,
}

impl<'a> OptionRef<'a> {
    /// Parse without copying (see [`OscoreOption::decode`]).
    pub fn parse(value: &'a [u8]) -> Result<Self, OscoreError> {
        let Some((&flags, mut rest)) = value.split_first() else {
            return Ok(Self::default());
        };
        if flags & 0xE0 != 0 {
            return Err(OscoreError::Decode("reserved OSCORE flag bits set"));
        }
        let n = usize::from(flags & 0x07);
        if n > MAX_PIV_LEN {
            return Err(OscoreError::Decode("reserved Partial IV length"));
        }
        let mut out = Self::default();
        if n > 0 {
            let piv = rest.get(..n).ok_or(OscoreError::Decode("truncated Partial IV"))?;
            out.partial_iv = Some(piv);
            rest = &rest[n..];
        }
        if flags & 0x10 != 0 {
            let (&s, after) = rest
                .split_first()
                .ok_or(OscoreError::Decode("truncated kid context"))?;
            let ctx = after
                .get(..usize::from(s))
                .ok_or(OscoreError::Decode("truncated kid context"))?;
            out.kid_context = Some(ctx);
            rest = &after[usize::from(s)..];
        }
        if flags & 0x08 != 0 {
            out.kid = Some(rest);
        } else if !rest.is_empty() {
            return Err(OscoreError::Decode("trailing bytes in the OSCORE option"));
        }
        if flags == 0 && value.len() > 1 {
            return Err(OscoreError::Decode("trailing bytes in the OSCORE option"));
        }
        Ok(out)
    }
}

/// Minimal big-endian encoding of a sequence number (0 encodes as 0x00).
pub fn piv_from_seq(seq: u64) -> Vec<u8> {
    let bytes = seq.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(7);
    bytes[first..].to_vec()
}

/// The sequence number in a Partial IV.
pub fn seq_from_piv(piv: &[u8]) -> Result<u64, OscoreError> {
    if piv.is_empty() || piv.len() > MAX_PIV_LEN {
        return Err(OscoreError::Decode("Partial IV length out of range"));
    }
    Ok(piv.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_examples_round_trip() {
        // C.4: PIV 0x14, empty kid.
        let o = OscoreOption::decode(&[0x09, 0x14]).expect("valid");
        assert_eq!(o.partial_iv.as_deref(), Some(&[0x14][..]));
        assert_eq!(o.kid.as_deref(), Some(&[][..]));
        assert_eq!(o.encode().expect("encode"), vec![0x09, 0x14]);
        // C.6: kid context.
        let v = hex::decode("19140837cbf3210017a2d3").expect("hex");
        let o = OscoreOption::decode(&v).expect("valid");
        assert_eq!(
            o.kid_context.as_deref(),
            Some(&hex::decode("37cbf3210017a2d3").expect("hex")[..])
        );
        assert_eq!(o.encode().expect("encode"), v);
        // C.7: empty.
        assert_eq!(OscoreOption::decode(&[]).expect("valid"), OscoreOption::default());
        assert_eq!(
            OscoreOption::default().encode().expect("encode"),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn malformed_options_are_decode_errors() {
        for bad in [
            &[0x20][..],               // reserved bit
            &[0x06, 1, 2, 3, 4, 5, 6], // PIV length 6 is reserved
            &[0x03, 1],                // truncated PIV
            &[0x10],                   // kid context flag without its length
            &[0x11, 0x01, 0x05, 0xAA], // kid context shorter than announced
            &[0x01, 0x01, 0xFF],       // trailing bytes without kid flag
            &[0x00, 0x01],             // flags zero but trailing bytes
        ] {
            assert!(
                matches!(OscoreOption::decode(bad), Err(OscoreError::Decode(_))),
                "{bad:02x?}"
            );
        }
    }

    #[test]
    fn piv_encoding_is_minimal() {
        assert_eq!(piv_from_seq(0), vec![0]);
        assert_eq!(piv_from_seq(20), vec![0x14]);
        assert_eq!(piv_from_seq(256), vec![1, 0]);
        assert_eq!(piv_from_seq((1 << 40) - 1), vec![0xFF; 5]);
        assert_eq!(seq_from_piv(&[1, 0]).expect("valid"), 256);
        assert!(seq_from_piv(&[]).is_err());
        assert!(seq_from_piv(&[1; 6]).is_err());
    }
}
