//! The ATLS TLS extensions of draft-friel-tls-atls §11 and the identifiers
//! they yield for OSCORE and COSE.

use std::fmt;

/// Private-use code point used for `oscore_connection_id` (the draft leaves it TBD).
pub const DEFAULT_OSCORE_CID_EXTENSION: u16 = 0xFF41;
/// Private-use code point used for `cose_ext` (the draft leaves it TBD).
pub const DEFAULT_COSE_EXTENSION: u16 = 0xFF42;
/// Largest CID the `opaque cid<0..2^8-1>` vector can carry.
pub const MAX_CID_LEN: usize = 255;

/// Which of the two ATLS protection modes an identifier pair belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtectionKind {
    /// OSCORE (§9.1, extension `oscore_connection_id`).
    Oscore,
    /// COSE (§9.2, extension `cose_ext`).
    Cose,
}

/// Code points and local CIDs for the two extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtensionConfig {
    /// Code point of `oscore_connection_id`.
    pub oscore_code_point: u16,
    /// Code point of `cose_ext`.
    pub cose_code_point: u16,
    /// Offer / answer `oscore_connection_id`.
    pub oscore: bool,
    /// Offer / answer `cose_ext`.
    pub cose: bool,
}

impl Default for ExtensionConfig {
    fn default() -> Self {
        Self {
            oscore_code_point: DEFAULT_OSCORE_CID_EXTENSION,
            cose_code_point: DEFAULT_COSE_EXTENSION,
            oscore: true,
            cose: true,
        }
    }
}

impl ExtensionConfig {
    /// Extensions disabled: the fallback identifiers always apply.
    pub fn disabled() -> Self {
        Self {
            oscore: false,
            cose: false,
            ..Self::default()
        }
    }
}

/// A connection identifier carried in one of the §11 extensions.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct ConnectionId(Vec<u8>);

impl ConnectionId {
    /// A CID from bytes; fails when longer than 255 bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, crate::Error> {
        let bytes = bytes.into();
        if bytes.len() > MAX_CID_LEN {
            return Err(crate::Error::Config(format!(
                "a connection id holds at most {MAX_CID_LEN} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }

    /// The CID bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Encode as the extension body: `opaque cid<0..2^8-1>`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len().saturating_add(1));
        // The constructor caps the length at 255, so this never truncates.
        out.push(u8::try_from(self.0.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&self.0);
        out
    }

    /// Decode an extension body; the vector must fill it exactly.
    pub fn decode(body: &[u8]) -> Option<Self> {
        let (&len, rest) = body.split_first()?;
        (rest.len() == usize::from(len)).then(|| Self(rest.to_vec()))
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "h'")?;
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "'")
    }
}

/// What one side learned from the handshake about one extension.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NegotiatedCids {
    /// This side's CID (sent in its hello), if it sent one.
    pub own: Option<ConnectionId>,
    /// The peer's CID, if the peer sent one.
    pub peer: Option<ConnectionId>,
}

impl NegotiatedCids {
    /// Negotiated means both hellos carried the extension.
    pub fn is_negotiated(&self) -> bool {
        self.own.is_some() && self.peer.is_some()
    }
}

/// Where a pair of identifiers came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdSource {
    /// Both hellos carried the extension (§11.1/§11.2).
    Negotiated,
    /// The extension was not negotiated: fixed identifiers apply and the
    /// transport session (HTTP cookie, CoAP endpoint) identifies the context.
    Fallback,
}

/// Sender and Recipient IDs (OSCORE) or sending/receiving kids (COSE) of one side.
#[derive(Clone, PartialEq, Eq)]
pub struct ProtectionIds {
    /// The ID this side puts on what it sends (OSCORE Sender ID / COSE kid it sends).
    pub sender_id: Vec<u8>,
    /// The ID the peer puts on what it sends to this side.
    pub recipient_id: Vec<u8>,
    /// Negotiated or fallback.
    pub source: IdSource,
}

impl fmt::Debug for ProtectionIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionIds")
            .field("sender_id", &ConnectionId(self.sender_id.clone()))
            .field("recipient_id", &ConnectionId(self.recipient_id.clone()))
            .field("source", &self.source)
            .finish()
    }
}

/// Fallback Sender ID of the client: the empty string.
pub const FALLBACK_CLIENT_SENDER_ID: &[u8] = b"";
/// Fallback Sender ID of the server: h'01'.
pub const FALLBACK_SERVER_SENDER_ID: &[u8] = &[0x01];

/// Derive one side's identifiers.
///
/// §11.1: the client's Sender ID is the CID the server sent, its Recipient ID
/// the CID it sent itself; the server mirrors that (its Sender ID is the
/// client's CID). Without the extension both sides use the fallback IDs.
pub fn protection_ids(is_client: bool, cids: &NegotiatedCids) -> ProtectionIds {
    match (&cids.own, &cids.peer) {
        (Some(own), Some(peer)) => ProtectionIds {
            sender_id: peer.as_bytes().to_vec(),
            recipient_id: own.as_bytes().to_vec(),
            source: IdSource::Negotiated,
        },
        _ => {
            let (sender, recipient) = if is_client {
                (FALLBACK_CLIENT_SENDER_ID, FALLBACK_SERVER_SENDER_ID)
            } else {
                (FALLBACK_SERVER_SENDER_ID, FALLBACK_CLIENT_SENDER_ID)
            };
            ProtectionIds {
                sender_id: sender.to_vec(),
                recipient_id: recipient.to_vec(),
                source: IdSource::Fallback,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_codec_round_trips_and_rejects_bad_lengths() {
        let cid = ConnectionId::new(vec![1, 2, 3]).expect("short");
        assert_eq!(cid.encode(), vec![3, 1, 2, 3]);
        assert_eq!(ConnectionId::decode(&cid.encode()), Some(cid));
        assert_eq!(ConnectionId::decode(&[0]), Some(ConnectionId::default()));
        assert_eq!(ConnectionId::decode(&[]), None);
        assert_eq!(ConnectionId::decode(&[2, 1]), None);
        assert_eq!(ConnectionId::decode(&[1, 1, 1]), None);
        assert!(ConnectionId::new(vec![0; 256]).is_err());
        assert_eq!(ConnectionId::new(vec![7; 255]).expect("max").encode().len(), 256);
    }

    #[test]
    fn negotiated_ids_cross_over() {
        let client = NegotiatedCids {
            own: Some(ConnectionId::new(vec![0xC1]).expect("cid")),
            peer: Some(ConnectionId::new(vec![0x5E]).expect("cid")),
        };
        let server = NegotiatedCids {
            own: client.peer.clone(),
            peer: client.own.clone(),
        };
        let c = protection_ids(true, &client);
        let s = protection_ids(false, &server);
        assert_eq!(c.source, IdSource::Negotiated);
        assert_eq!(c.sender_id, vec![0x5E], "client sends with the server's CID");
        assert_eq!(c.recipient_id, vec![0xC1]);
        assert_eq!(c.sender_id, s.recipient_id);
        assert_eq!(c.recipient_id, s.sender_id);
    }

    #[test]
    fn fallback_ids_without_extension() {
        let offered_only = NegotiatedCids {
            own: Some(ConnectionId::new(vec![0xC1]).expect("cid")),
            peer: None,
        };
        let c = protection_ids(true, &offered_only);
        assert_eq!(c.source, IdSource::Fallback);
        assert_eq!(c.sender_id, b"");
        assert_eq!(c.recipient_id, vec![0x01]);
        let s = protection_ids(false, &NegotiatedCids::default());
        assert_eq!(s.sender_id, vec![0x01]);
        assert_eq!(s.recipient_id, b"");
    }
}
