//! Engine-neutral configuration of ATLS clients and servers.

use std::fmt;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::Error;
use crate::ext::{ConnectionId, ExtensionConfig};
use crate::records::Framing;
use crate::suites::CipherSuite;

/// A protocol version an ATLS session may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2 (RFC 5246).
    Tls12,
    /// TLS 1.3 (RFC 8446).
    Tls13,
    /// DTLS 1.2 (RFC 6347).
    Dtls12,
}

impl TlsVersion {
    /// The record framing of this version.
    pub fn framing(self) -> Framing {
        match self {
            Self::Tls12 | Self::Tls13 => Framing::Tls,
            Self::Dtls12 => Framing::Dtls,
        }
    }

    /// The usual name ("TLSv1.3").
    pub fn name(self) -> &'static str {
        match self {
            Self::Tls12 => "TLSv1.2",
            Self::Tls13 => "TLSv1.3",
            Self::Dtls12 => "DTLSv1.2",
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A DER-encoded X.509 certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate(pub Vec<u8>);

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Certificate({} bytes DER)", self.0.len())
    }
}

impl Certificate {
    /// Every certificate in a PEM text.
    pub fn all_from_pem(pem: &[u8]) -> Result<Vec<Certificate>, Error> {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .map(|c| c.map(|c| Certificate(c.to_vec())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Config(format!("bad certificate PEM: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Config("no certificate in PEM input".into()));
        }
        Ok(certs)
    }
}

/// A DER-encoded private key (PKCS#8, SEC1 or PKCS#1), zeroized on drop and never printed.
#[derive(Clone)]
pub struct PrivateKey {
    der: Zeroizing<Vec<u8>>,
}

impl PrivateKey {
    /// A key from DER bytes: PKCS#8 (`PrivateKeyInfo`), SEC1
    /// (`ECPrivateKey`) or PKCS#1 (`RSAPrivateKey`); engines tell the
    /// formats apart by their structure.
    pub fn from_der(der: Vec<u8>) -> Self {
        Self {
            der: Zeroizing::new(der),
        }
    }

    /// The first private key in a PEM text: `PRIVATE KEY` (PKCS#8), `EC
    /// PRIVATE KEY` (SEC1) or `RSA PRIVATE KEY` (PKCS#1).
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        use rustls_pki_types::pem::PemObject;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| Error::Config(format!("bad private key PEM: {e}")))?;
        Ok(Self::from_der(key.secret_der().to_vec()))
    }

    /// The DER bytes. Handing key bytes out is dangerous; engines call this once.
    pub fn dangerous_der(&self) -> &[u8] {
        &self.der
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A certificate chain (end-entity first) with its private key.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    /// The chain, end-entity certificate first.
    pub chain: Vec<Certificate>,
    /// The end-entity certificate's key.
    pub key: PrivateKey,
}

/// An external pre-shared key (RFC 4279 for TLS 1.2, RFC 8446 §2.2 for TLS 1.3).
#[derive(Clone)]
pub struct Psk {
    /// The PSK identity (sent in the clear).
    pub identity: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
}

impl Psk {
    /// A PSK from an identity and key bytes.
    pub fn new(identity: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let identity = identity.into();
        let key = Zeroizing::new(key.into());
        if identity.is_empty() || identity.len() > 128 {
            return Err(Error::Config("a PSK identity holds 1 to 128 bytes".into()));
        }
        if key.len() < 16 || key.len() > 64 {
            return Err(Error::Config("a PSK holds 16 to 64 bytes".into()));
        }
        Ok(Self { identity, key })
    }

    /// Parse `IDENTITY:HEXKEY`, the command-line form.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let (identity, hex_key) = spec
            .rsplit_once(':')
            .ok_or_else(|| Error::Config("a PSK is written IDENTITY:HEXKEY".into()))?;
        let mut key = Vec::with_capacity(hex_key.len() / 2);
        let digits = hex_key.as_bytes();
        if digits.len() % 2 != 0 {
            return Err(Error::Config("PSK key: odd number of hex digits".into()));
        }
        for pair in digits.chunks(2) {
            let text = std::str::from_utf8(pair).map_err(|_| Error::Config("PSK key: not hex".into()))?;
            key.push(u8::from_str_radix(text, 16).map_err(|_| Error::Config("PSK key: not hex".into()))?);
        }
        Self::new(identity.as_bytes().to_vec(), key)
    }

    /// The key bytes. Handing key bytes out is dangerous; engines call this in their callbacks.
    pub fn dangerous_key(&self) -> &[u8] {
        &self.key
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Psk")
            .field("identity", &String::from_utf8_lossy(&self.identity))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// DTLS retransmission and packetisation settings (RFC 6347 §4.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtlsConfig {
    /// Largest datagram the engine writes; flights are fragmented to fit.
    pub mtu: u16,
    /// First retransmission timeout; it doubles on every retransmission.
    pub initial_timeout: Duration,
    /// Upper bound of the doubling.
    pub max_timeout: Duration,
    /// Server: answer a ClientHello without a valid cookie with a
    /// HelloVerifyRequest (RFC 6347 §4.2.1) before any key exchange, so a
    /// spoofed source gets a small answer and costs no public-key
    /// operation. For DTLS on a real datagram transport (the `coaps://`
    /// hop); the ATLS layer over CoAP validates addresses with Echo instead.
    pub cookie_exchange: bool,
}

impl Default for DtlsConfig {
    fn default() -> Self {
        Self {
            mtu: 1200,
            initial_timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(60),
            cookie_exchange: false,
        }
    }
}

/// Bounds on what a peer can make a session hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest flight accepted by `push_flight`.
    pub max_flight_len: usize,
    /// Largest amount of received application data buffered before the
    /// application takes it.
    pub max_buffered_application_data: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_flight_len: 64 * 1024,
            max_buffered_application_data: 1024 * 1024,
        }
    }
}

/// Settings shared by clients and servers.
#[derive(Clone, Debug)]
pub struct CommonConfig {
    /// Versions to enable. All must share one framing (TLS or DTLS).
    pub versions: Vec<TlsVersion>,
    /// Cipher suites to enable, in preference order; `None` keeps the engine's
    /// defaults (restricted to suites with a §10 mapping).
    pub cipher_suites: Option<Vec<CipherSuite>>,
    /// Extension code points.
    pub extensions: ExtensionConfig,
    /// DTLS settings.
    pub dtls: DtlsConfig,
    /// Resource bounds.
    pub limits: Limits,
    /// Allow session resumption (tickets).
    pub resumption: bool,
}

impl Default for CommonConfig {
    fn default() -> Self {
        Self {
            versions: vec![TlsVersion::Tls13, TlsVersion::Tls12],
            cipher_suites: None,
            extensions: ExtensionConfig::default(),
            dtls: DtlsConfig::default(),
            limits: Limits::default(),
            resumption: true,
        }
    }
}

impl CommonConfig {
    /// The framing of the configured versions; fails on a mix or on none.
    pub fn framing(&self) -> Result<Framing, Error> {
        let first = self
            .versions
            .first()
            .ok_or_else(|| Error::Config("no protocol version enabled".into()))?
            .framing();
        if self.versions.iter().any(|v| v.framing() != first) {
            return Err(Error::Config(
                "TLS and DTLS versions cannot be mixed in one config".into(),
            ));
        }
        Ok(first)
    }
}

/// Client configuration.
#[derive(Clone, Debug, Default)]
pub struct ClientConfig {
    /// Versions, suites, extensions, limits.
    pub common: CommonConfig,
    /// Trust anchors for the server certificate. Empty with a PSK means PSK only.
    pub trust_anchors: Vec<Certificate>,
    /// Client certificate for mutual authentication.
    pub client_auth: Option<CertifiedKey>,
    /// External PSK.
    pub psk: Option<Psk>,
    /// Offer TLS 1.3 0-RTT when resuming.
    pub early_data: bool,
}

/// Server configuration.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// Versions, suites, extensions, limits.
    pub common: CommonConfig,
    /// The server certificate and key.
    pub identity: Option<CertifiedKey>,
    /// When set, clients must present a certificate chaining to one of these.
    pub client_auth_roots: Option<Vec<Certificate>>,
    /// External PSKs the server accepts, looked up by identity.
    pub psks: Vec<Psk>,
    /// Most early data accepted per session (0 disables 0-RTT).
    pub max_early_data: u32,
}

/// Per-session client parameters.
#[derive(Clone, Debug, Default)]
pub struct ClientSessionParams {
    /// SNI and the name the server certificate is verified against.
    pub server_name: Option<String>,
    /// The client's `oscore_connection_id` CID; `Some` offers the extension.
    pub oscore_cid: Option<ConnectionId>,
    /// The client's `cose_ext` CID; `Some` offers the extension.
    pub cose_cid: Option<ConnectionId>,
}

/// Per-session server parameters.
#[derive(Clone, Debug, Default)]
pub struct ServerSessionParams {
    /// The server's `oscore_connection_id` CID, sent only if the client offered the extension.
    /// A server must keep these unique across its live contexts.
    pub oscore_cid: Option<ConnectionId>,
    /// The server's `cose_ext` CID, likewise.
    pub cose_cid: Option<ConnectionId>,
    /// DTLS with `DtlsConfig::cookie_exchange`: the HelloVerifyRequest
    /// cookie the transport already checked statelessly for this peer (see
    /// `atls_coap::dtls`). The engine's own HelloVerifyRequest then carries
    /// it and a ClientHello must return it; without it the engine makes one
    /// random cookie per session.
    pub dtls_cookie: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_parsing_and_redaction() {
        let psk = Psk::parse("device-1:000102030405060708090a0b0c0d0e0f").expect("valid");
        assert_eq!(psk.identity, b"device-1");
        assert_eq!(psk.dangerous_key().len(), 16);
        assert!(!format!("{psk:?}").contains("0001"));
        assert!(Psk::parse("nokey").is_err());
        assert!(Psk::parse("id:0g").is_err());
        assert!(Psk::parse("id:00").is_err(), "too short");
    }

    #[test]
    fn mixed_framings_are_rejected() {
        let common = CommonConfig {
            versions: vec![TlsVersion::Tls12, TlsVersion::Dtls12],
            ..CommonConfig::default()
        };
        assert!(common.framing().is_err());
        assert_eq!(CommonConfig::default().framing(), Ok(Framing::Tls));
    }

    #[test]
    fn private_keys_are_never_printed() {
        let key = PrivateKey::from_der(vec![0xAA; 32]);
        assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");
    }
}
