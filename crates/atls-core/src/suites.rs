//! TLS cipher suites and the draft's §10 mapping to COSE/OSCORE algorithms.

use std::fmt;

/// A TLS cipher suite by its IANA code point.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CipherSuite(pub u16);

/// A COSE AEAD algorithm usable for OSCORE/COSE (RFC 9053 identifiers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CoseAead {
    /// AES-CCM-16-64-128 (10): 128-bit key, 64-bit tag, 13-byte nonce.
    AesCcm16_64_128,
    /// AES-CCM-16-64-256 (11): 256-bit key, 64-bit tag, 13-byte nonce.
    AesCcm16_64_256,
    /// AES-CCM-16-128-128 (30): 128-bit key, 128-bit tag, 13-byte nonce.
    AesCcm16_128_128,
    /// AES-CCM-16-128-256 (31): 256-bit key, 128-bit tag, 13-byte nonce.
    AesCcm16_128_256,
    /// A128GCM (1).
    A128Gcm,
    /// A256GCM (3).
    A256Gcm,
    /// ChaCha20/Poly1305 (24).
    ChaCha20Poly1305,
}

impl CoseAead {
    /// The COSE algorithm identifier.
    pub fn cose_id(self) -> i64 {
        match self {
            Self::AesCcm16_64_128 => 10,
            Self::AesCcm16_64_256 => 11,
            Self::AesCcm16_128_128 => 30,
            Self::AesCcm16_128_256 => 31,
            Self::A128Gcm => 1,
            Self::A256Gcm => 3,
            Self::ChaCha20Poly1305 => 24,
        }
    }

    /// Look an algorithm up by its COSE identifier.
    pub fn from_cose_id(id: i64) -> Option<Self> {
        Some(match id {
            10 => Self::AesCcm16_64_128,
            11 => Self::AesCcm16_64_256,
            30 => Self::AesCcm16_128_128,
            31 => Self::AesCcm16_128_256,
            1 => Self::A128Gcm,
            3 => Self::A256Gcm,
            24 => Self::ChaCha20Poly1305,
            _ => return None,
        })
    }

    /// The COSE algorithm name.
    pub fn name(self) -> &'static str {
        match self {
            Self::AesCcm16_64_128 => "AES-CCM-16-64-128",
            Self::AesCcm16_64_256 => "AES-CCM-16-64-256",
            Self::AesCcm16_128_128 => "AES-CCM-16-128-128",
            Self::AesCcm16_128_256 => "AES-CCM-16-128-256",
            Self::A128Gcm => "A128GCM",
            Self::A256Gcm => "A256GCM",
            Self::ChaCha20Poly1305 => "ChaCha20/Poly1305",
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::AesCcm16_64_128 | Self::AesCcm16_128_128 | Self::A128Gcm => 16,
            Self::AesCcm16_64_256 | Self::AesCcm16_128_256 | Self::A256Gcm | Self::ChaCha20Poly1305 => 32,
        }
    }

    /// Nonce length in bytes.
    pub fn nonce_len(self) -> usize {
        match self {
            Self::A128Gcm | Self::A256Gcm | Self::ChaCha20Poly1305 => 12,
            _ => 13,
        }
    }

    /// Authentication tag length in bytes.
    pub fn tag_len(self) -> usize {
        match self {
            Self::AesCcm16_64_128 | Self::AesCcm16_64_256 => 8,
            _ => 16,
        }
    }
}

/// The hash function of the HKDF used to derive OSCORE/COSE contexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HkdfHash {
    /// HKDF SHA-256 (COSE -10).
    Sha256,
    /// HKDF SHA-384 (no COSE HKDF id is registered; see docs/PROTOCOL.md).
    Sha384,
    /// HKDF SHA-512 (COSE -11).
    Sha512,
}

/// One row of the §10 table, resolved for a negotiated suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlgorithmMapping {
    /// The negotiated TLS cipher suite.
    pub suite: CipherSuite,
    /// The COSE/OSCORE AEAD.
    pub aead: CoseAead,
    /// The HKDF hash: SHA-256 for 128-bit keys, SHA-384 for 256-bit keys (§9.1).
    pub hkdf: HkdfHash,
}

impl AlgorithmMapping {
    /// Length of the keying material to export: twice the AEAD key length
    /// (first half Master Secret, second half Master Salt; §9.1).
    pub fn export_len(&self) -> usize {
        self.aead.key_len().saturating_mul(2)
    }
}

/// The suites this project knows by name, with the AEAD family of each (the §10 rows).
/// `None` marks suites that are known but carry no AEAD mapping (CBC suites).
const SUITES: &[(u16, &str, Option<CoseAead>)] = {
    use CoseAead::*;
    &[
        // TLS 1.3 (RFC 8446 B.4)
        (0x1301, "TLS_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0x1302, "TLS_AES_256_GCM_SHA384", Some(A256Gcm)),
        (0x1303, "TLS_CHACHA20_POLY1305_SHA256", Some(ChaCha20Poly1305)),
        (0x1304, "TLS_AES_128_CCM_SHA256", Some(AesCcm16_128_128)),
        (0x1305, "TLS_AES_128_CCM_8_SHA256", Some(AesCcm16_64_128)),
        // TLS 1.2 AES-GCM
        (0x009C, "TLS_RSA_WITH_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0x009D, "TLS_RSA_WITH_AES_256_GCM_SHA384", Some(A256Gcm)),
        (0x009E, "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0x009F, "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", Some(A256Gcm)),
        (0x00A8, "TLS_PSK_WITH_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0x00A9, "TLS_PSK_WITH_AES_256_GCM_SHA384", Some(A256Gcm)),
        (0x00AA, "TLS_DHE_PSK_WITH_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0x00AB, "TLS_DHE_PSK_WITH_AES_256_GCM_SHA384", Some(A256Gcm)),
        (0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0xC02C, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", Some(A256Gcm)),
        (0xC02F, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0xC030, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", Some(A256Gcm)),
        (0xD001, "TLS_ECDHE_PSK_WITH_AES_128_GCM_SHA256", Some(A128Gcm)),
        (0xD002, "TLS_ECDHE_PSK_WITH_AES_256_GCM_SHA384", Some(A256Gcm)),
        // TLS 1.2 ChaCha20-Poly1305 (RFC 7905)
        (
            0xCCA8,
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            Some(ChaCha20Poly1305),
        ),
        (
            0xCCA9,
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            Some(ChaCha20Poly1305),
        ),
        (
            0xCCAA,
            "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            Some(ChaCha20Poly1305),
        ),
        (
            0xCCAB,
            "TLS_PSK_WITH_CHACHA20_POLY1305_SHA256",
            Some(ChaCha20Poly1305),
        ),
        (
            0xCCAC,
            "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
            Some(ChaCha20Poly1305),
        ),
        (
            0xCCAD,
            "TLS_DHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
            Some(ChaCha20Poly1305),
        ),
        // TLS 1.2 AES-CCM (RFC 6655, RFC 7251, RFC 8442)
        (0xC09C, "TLS_RSA_WITH_AES_128_CCM", Some(AesCcm16_128_128)),
        (0xC09D, "TLS_RSA_WITH_AES_256_CCM", Some(AesCcm16_128_256)),
        (0xC09E, "TLS_DHE_RSA_WITH_AES_128_CCM", Some(AesCcm16_128_128)),
        (0xC09F, "TLS_DHE_RSA_WITH_AES_256_CCM", Some(AesCcm16_128_256)),
        (0xC0A0, "TLS_RSA_WITH_AES_128_CCM_8", Some(AesCcm16_64_128)),
        (0xC0A1, "TLS_RSA_WITH_AES_256_CCM_8", Some(AesCcm16_64_256)),
        (0xC0A2, "TLS_DHE_RSA_WITH_AES_128_CCM_8", Some(AesCcm16_64_128)),
        (0xC0A3, "TLS_DHE_RSA_WITH_AES_256_CCM_8", Some(AesCcm16_64_256)),
        (0xC0A4, "TLS_PSK_WITH_AES_128_CCM", Some(AesCcm16_128_128)),
        (0xC0A5, "TLS_PSK_WITH_AES_256_CCM", Some(AesCcm16_128_256)),
        (0xC0A6, "TLS_DHE_PSK_WITH_AES_128_CCM", Some(AesCcm16_128_128)),
        (0xC0A7, "TLS_DHE_PSK_WITH_AES_256_CCM", Some(AesCcm16_128_256)),
        (0xC0A8, "TLS_PSK_WITH_AES_128_CCM_8", Some(AesCcm16_64_128)),
        (0xC0A9, "TLS_PSK_WITH_AES_256_CCM_8", Some(AesCcm16_64_256)),
        (0xC0AA, "TLS_PSK_DHE_WITH_AES_128_CCM_8", Some(AesCcm16_64_128)),
        (0xC0AB, "TLS_PSK_DHE_WITH_AES_256_CCM_8", Some(AesCcm16_64_256)),
        (0xC0AC, "TLS_ECDHE_ECDSA_WITH_AES_128_CCM", Some(AesCcm16_128_128)),
        (0xC0AD, "TLS_ECDHE_ECDSA_WITH_AES_256_CCM", Some(AesCcm16_128_256)),
        (
            0xC0AE,
            "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
            Some(AesCcm16_64_128),
        ),
        (
            0xC0AF,
            "TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8",
            Some(AesCcm16_64_256),
        ),
        (
            0xD003,
            "TLS_ECDHE_PSK_WITH_AES_128_CCM_8_SHA256",
            Some(AesCcm16_64_128),
        ),
        (
            0xD005,
            "TLS_ECDHE_PSK_WITH_AES_128_CCM_SHA256",
            Some(AesCcm16_128_128),
        ),
        // Known suites without an AEAD mapping (CBC): an ATLS export refuses them.
        (0x002F, "TLS_RSA_WITH_AES_128_CBC_SHA", None),
        (0x0035, "TLS_RSA_WITH_AES_256_CBC_SHA", None),
        (0x008C, "TLS_PSK_WITH_AES_128_CBC_SHA", None),
        (0x00AE, "TLS_PSK_WITH_AES_128_CBC_SHA256", None),
        (0xC009, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", None),
        (0xC013, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", None),
        (0xC023, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", None),
        (0xC027, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", None),
    ]
};

impl CipherSuite {
    /// The IANA name, if this project knows the suite.
    pub fn name(self) -> Option<&'static str> {
        SUITES.iter().find(|row| row.0 == self.0).map(|row| row.1)
    }

    /// Look a suite up by its IANA name (`TLS_AES_128_GCM_SHA256`).
    pub fn from_name(name: &str) -> Option<Self> {
        SUITES
            .iter()
            .find(|row| row.1.eq_ignore_ascii_case(name))
            .map(|row| CipherSuite(row.0))
    }

    /// Whether this is a TLS 1.3 suite.
    pub fn is_tls13(self) -> bool {
        (0x1301..=0x1305).contains(&self.0)
    }

    /// The §10 mapping for this suite: the COSE/OSCORE AEAD and the HKDF hash.
    ///
    /// Fails with [`crate::Error::UnmappedCipherSuite`] for a suite with no row:
    /// the project never guesses an algorithm.
    pub fn atls_mapping(self) -> Result<AlgorithmMapping, crate::Error> {
        let aead = SUITES
            .iter()
            .find(|row| row.0 == self.0)
            .and_then(|row| row.2)
            .ok_or(crate::Error::UnmappedCipherSuite(self))?;
        let hkdf = match aead.key_len() {
            16 => HkdfHash::Sha256,
            _ => HkdfHash::Sha384,
        };
        Ok(AlgorithmMapping {
            suite: self,
            aead,
            hkdf,
        })
    }

    /// Every suite with a §10 mapping, for tests and documentation.
    pub fn all_mapped() -> impl Iterator<Item = CipherSuite> {
        SUITES
            .iter()
            .filter(|row| row.2.is_some())
            .map(|row| CipherSuite(row.0))
    }
}

impl fmt::Display for CipherSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{:#06x}", self.0),
        }
    }
}

impl fmt::Debug for CipherSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CipherSuite({self} {:#06x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// One assertion per row of the draft's Figure 13, through the suite names
    /// of both TLS versions that carry that AEAD.
    fn check(name: &str, cose_id: i64, key_len: usize, hkdf: HkdfHash) {
        let suite = CipherSuite::from_name(name).unwrap_or_else(|| panic!("unknown {name}"));
        let mapping = suite.atls_mapping().expect("mapped");
        assert_eq!(mapping.aead.cose_id(), cose_id, "{name}");
        assert_eq!(mapping.aead.key_len(), key_len, "{name}");
        assert_eq!(mapping.hkdf, hkdf, "{name}");
        assert_eq!(mapping.export_len(), 2 * key_len, "{name}");
    }

    #[test]
    fn row_aes_128_ccm_8() {
        check("TLS_AES_128_CCM_8_SHA256", 10, 16, HkdfHash::Sha256);
        check("TLS_PSK_WITH_AES_128_CCM_8", 10, 16, HkdfHash::Sha256);
        check("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", 10, 16, HkdfHash::Sha256);
        assert_eq!(CoseAead::AesCcm16_64_128.tag_len(), 8);
        assert_eq!(CoseAead::AesCcm16_64_128.nonce_len(), 13);
    }

    #[test]
    fn row_aes_256_ccm_8() {
        check("TLS_PSK_WITH_AES_256_CCM_8", 11, 32, HkdfHash::Sha384);
        check("TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8", 11, 32, HkdfHash::Sha384);
        assert_eq!(CoseAead::AesCcm16_64_256.tag_len(), 8);
    }

    #[test]
    fn row_chacha20_poly1305() {
        check("TLS_CHACHA20_POLY1305_SHA256", 24, 32, HkdfHash::Sha384);
        check(
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            24,
            32,
            HkdfHash::Sha384,
        );
        check("TLS_PSK_WITH_CHACHA20_POLY1305_SHA256", 24, 32, HkdfHash::Sha384);
        assert_eq!(CoseAead::ChaCha20Poly1305.tag_len(), 16);
    }

    #[test]
    fn row_aes_128_ccm() {
        check("TLS_AES_128_CCM_SHA256", 30, 16, HkdfHash::Sha256);
        check("TLS_PSK_WITH_AES_128_CCM", 30, 16, HkdfHash::Sha256);
        check("TLS_ECDHE_ECDSA_WITH_AES_128_CCM", 30, 16, HkdfHash::Sha256);
        assert_eq!(CoseAead::AesCcm16_128_128.tag_len(), 16);
    }

    #[test]
    fn row_aes_256_ccm() {
        check("TLS_PSK_WITH_AES_256_CCM", 31, 32, HkdfHash::Sha384);
        check("TLS_ECDHE_ECDSA_WITH_AES_256_CCM", 31, 32, HkdfHash::Sha384);
    }

    #[test]
    fn row_aes_128_gcm() {
        check("TLS_AES_128_GCM_SHA256", 1, 16, HkdfHash::Sha256);
        check("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", 1, 16, HkdfHash::Sha256);
        check("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", 1, 16, HkdfHash::Sha256);
        check("TLS_PSK_WITH_AES_128_GCM_SHA256", 1, 16, HkdfHash::Sha256);
    }

    #[test]
    fn row_aes_256_gcm() {
        check("TLS_AES_256_GCM_SHA384", 3, 32, HkdfHash::Sha384);
        check("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", 3, 32, HkdfHash::Sha384);
        check("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", 3, 32, HkdfHash::Sha384);
    }

    #[test]
    fn unmapped_suites_are_an_error_not_a_guess() {
        let cbc = CipherSuite::from_name("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA").expect("known");
        assert_eq!(cbc.atls_mapping(), Err(Error::UnmappedCipherSuite(cbc)));
        let unknown = CipherSuite(0x1234);
        assert_eq!(unknown.atls_mapping(), Err(Error::UnmappedCipherSuite(unknown)));
        assert_eq!(unknown.to_string(), "0x1234");
    }

    #[test]
    fn every_mapped_suite_round_trips_its_cose_id() {
        for suite in CipherSuite::all_mapped() {
            let aead = suite.atls_mapping().expect("mapped").aead;
            assert_eq!(CoseAead::from_cose_id(aead.cose_id()), Some(aead));
        }
    }
}
