//! Exported keying material and the draft's §9 key schedule.

use std::fmt;

use zeroize::Zeroizing;

use crate::ext::ProtectionKind;
use crate::suites::AlgorithmMapping;

/// Exporter label for OSCORE (§9.1).
pub const LABEL_OSCORE: &[u8] = b"atls-oscore";
/// Exporter label for COSE (§9.2).
pub const LABEL_COSE: &[u8] = b"atls-cose";
/// Generic exporter label (§12.7; -01 §7.1).
pub const LABEL_GENERIC: &[u8] = b"application-layer-tls";
/// The per-association context of §9: empty (zero length, but present).
pub const EXPORT_CONTEXT: &[u8] = b"";

impl ProtectionKind {
    /// The exporter label of this kind.
    pub fn label(self) -> &'static [u8] {
        match self {
            Self::Oscore => LABEL_OSCORE,
            Self::Cose => LABEL_COSE,
        }
    }
}

/// Secret bytes: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret itself. Whoever calls this is responsible for not leaking it.
    pub fn dangerous_as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// The §9 export: Master Secret, Master Salt and the algorithms to use them with.
#[derive(Clone, Debug)]
pub struct AtlsKeys {
    /// OSCORE or COSE.
    pub kind: ProtectionKind,
    /// AEAD and HKDF from the §10 table.
    pub algorithms: AlgorithmMapping,
    /// First half of the export.
    pub master_secret: SecretBytes,
    /// Second half of the export.
    pub master_salt: SecretBytes,
}

impl AtlsKeys {
    pub(crate) fn split(kind: ProtectionKind, algorithms: AlgorithmMapping, export: &[u8]) -> Self {
        let half = export.len() / 2;
        let (secret, salt) = export.split_at(half);
        Self {
            kind,
            algorithms,
            master_secret: SecretBytes::new(secret.to_vec()),
            master_salt: SecretBytes::new(salt.to_vec()),
        }
    }
}
