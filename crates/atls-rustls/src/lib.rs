//! The rustls engine for ATLS (rustls 0.23 with the *ring* provider).
//!
//! TLS 1.2 and 1.3 over in-memory buffers: certificate authentication
//! (one-way and mutual), resumption and TLS 1.3 0-RTT. rustls has no DTLS, no
//! external PSK and no API for custom extensions, so sessions on this engine
//! always use the fallback OSCORE/COSE identifiers (the core reports
//! [`atls_core::IdSource::Fallback`]); asking for DTLS or a PSK is a typed
//! [`atls_core::Error::Unsupported`] error.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use atls_core::engine::{
    Capabilities, ClientEndpoint, Engine, HandshakeInfo, PeerIdentity, ServerEndpoint, TlsSession,
};
use atls_core::{
    Alert, Certificate, CipherSuite, ClientConfig, ClientSessionParams, CommonConfig, Error, Framing,
    NegotiatedCids, ServerConfig, ServerSessionParams, TlsVersion,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{Connection, HandshakeKind, ProtocolVersion, RootCertStore};

const ENGINE: &str = "rustls";
const READ_CHUNK: usize = 16 * 1024;

/// The rustls engine.
#[derive(Clone, Copy, Debug, Default)]
pub struct RustlsEngine;

fn config_error(e: impl fmt::Display) -> Error {
    Error::Config(e.to_string())
}

fn unsupported(feature: &'static str) -> Error {
    Error::Unsupported {
        engine: ENGINE,
        feature,
    }
}

/// The *ring* provider restricted to the configured suites.
fn provider(common: &CommonConfig) -> Result<Arc<CryptoProvider>, Error> {
    if common.framing()? == Framing::Dtls {
        return Err(unsupported("DTLS"));
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(wanted) = &common.cipher_suites {
        provider
            .cipher_suites
            .retain(|s| wanted.contains(&CipherSuite(u16::from(s.suite()))));
        // Keep the caller's preference order.
        provider.cipher_suites.sort_by_key(|s| {
            wanted
                .iter()
                .position(|w| *w == CipherSuite(u16::from(s.suite())))
                .unwrap_or(usize::MAX)
        });
        if provider.cipher_suites.is_empty() {
            return Err(Error::Config(
                "none of the configured cipher suites is available in rustls".into(),
            ));
        }
    }
    Ok(Arc::new(provider))
}

fn versions(common: &CommonConfig) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let mut out = Vec::new();
    if common.versions.contains(&TlsVersion::Tls13) {
        out.push(&rustls::version::TLS13);
    }
    if common.versions.contains(&TlsVersion::Tls12) {
        out.push(&rustls::version::TLS12);
    }
    out
}

fn roots(anchors: &[Certificate]) -> Result<RootCertStore, Error> {
    let mut store = RootCertStore::empty();
    for anchor in anchors {
        store
            .add(CertificateDer::from(anchor.0.clone()))
            .map_err(|e| Error::Config(format!("trust anchor: {e}")))?;
    }
    Ok(store)
}

/// The chain and key of `identity` in rustls' types (for any rustls
/// configuration built beside this engine, e.g. a plain HTTPS listener with
/// the same certificate). The key's format (PKCS#8, SEC1 or PKCS#1) is
/// detected from its DER structure.
pub fn chain_and_key(
    identity: &atls_core::CertifiedKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let chain = identity
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.0.clone()))
        .collect();
    let key = PrivateKeyDer::try_from(identity.key.dangerous_der())
        .map_err(|e| Error::Config(format!("private key: {e}")))?
        .clone_key();
    Ok((chain, key))
}

struct RustlsClient {
    config: ClientConfig,
    rustls: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for RustlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct RustlsServer {
    config: ServerConfig,
    rustls: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for RustlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Engine for RustlsEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            versions: &[TlsVersion::Tls12, TlsVersion::Tls13],
            psk: false,
            atls_extensions: false,
            early_data: true,
        }
    }

    fn client(&self, config: &ClientConfig) -> Result<Arc<dyn ClientEndpoint>, Error> {
        if config.psk.is_some() {
            return Err(unsupported("external PSK"));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider(&config.common)?)
            .with_protocol_versions(&versions(&config.common))
            .map_err(config_error)?
            .with_root_certificates(roots(&config.trust_anchors)?);
        let mut rustls = match &config.client_auth {
            Some(identity) => {
                let (chain, key) = chain_and_key(identity)?;
                builder.with_client_auth_cert(chain, key).map_err(config_error)?
            }
            None => builder.with_no_client_auth(),
        };
        rustls.enable_early_data = config.early_data;
        rustls.resumption = if config.common.resumption {
            rustls::client::Resumption::in_memory_sessions(256)
        } else {
            rustls::client::Resumption::disabled()
        };
        Ok(Arc::new(RustlsClient {
            config: config.clone(),
            rustls: Arc::new(rustls),
        }))
    }

    fn server(&self, config: &ServerConfig) -> Result<Arc<dyn ServerEndpoint>, Error> {
        if !config.psks.is_empty() {
            return Err(unsupported("external PSK"));
        }
        let provider = provider(&config.common)?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&versions(&config.common))
            .map_err(config_error)?;
        let builder = match &config.client_auth_roots {
            Some(anchors) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(anchors)?), provider)
                        .build()
                        .map_err(config_error)?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let identity = config
            .identity
            .as_ref()
            .ok_or_else(|| Error::Config("a rustls server needs a certificate".into()))?;
        let (chain, key) = chain_and_key(identity)?;
        let mut rustls = builder.with_single_cert(chain, key).map_err(config_error)?;
        if config.common.resumption {
            rustls.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
            rustls.max_early_data_size = config.max_early_data;
        } else {
            rustls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            rustls.send_tls13_tickets = 0;
        }
        Ok(Arc::new(RustlsServer {
            config: config.clone(),
            rustls: Arc::new(rustls),
        }))
    }
}

impl ClientEndpoint for RustlsClient {
    fn start(&self, params: &ClientSessionParams) -> Result<Box<dyn TlsSession>, Error> {
        let name = params
            .server_name
            .clone()
            .ok_or_else(|| Error::Config("the rustls engine needs a server name to verify".into()))?;
        let server_name = ServerName::try_from(name.clone()).map_err(config_error)?;
        let conn =
            rustls::ClientConnection::new(Arc::clone(&self.rustls), server_name).map_err(config_error)?;
        Ok(Box::new(RustlsSession::new(Connection::Client(conn), Some(name))))
    }

    fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }
}

impl ServerEndpoint for RustlsServer {
    fn accept(&self, _params: &ServerSessionParams) -> Result<Box<dyn TlsSession>, Error> {
        let conn = rustls::ServerConnection::new(Arc::clone(&self.rustls)).map_err(config_error)?;
        Ok(Box::new(RustlsSession::new(Connection::Server(conn), None)))
    }

    fn config(&self) -> &ServerConfig {
        &self.config
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }
}

/// One rustls connection over in-memory buffers.
struct RustlsSession {
    conn: Connection,
    input: Vec<u8>,
    output: Vec<u8>,
    app_in: Vec<u8>,
    early_in: Vec<u8>,
    early_received: bool,
    server_name: Option<String>,
    peer_closed: bool,
}

impl fmt::Debug for RustlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .finish_non_exhaustive()
    }
}

/// A certificate error in words: the names a certificate carries, not
/// rustls's debug form.
fn certificate_error(reason: &rustls::CertificateError) -> String {
    use rustls::CertificateError as E;
    fn name(debug: &str) -> String {
        let inner = debug
            .split_once('(')
            .map_or(debug, |(_, rest)| rest.strip_suffix(')').unwrap_or(rest));
        inner.trim_matches('"').to_owned()
    }
    match reason {
        E::NotValidForNameContext { expected, presented } => format!(
            "the certificate does not name {} (it names {})",
            name(&format!("{expected:?}")),
            presented.iter().map(|p| name(p)).collect::<Vec<_>>().join(", ")
        ),
        E::NotValidForName => "the certificate does not name the server".into(),
        E::UnknownIssuer => "the certificate is not issued by a trusted CA".into(),
        E::BadSignature => "the certificate's signature does not verify".into(),
        E::Expired | E::ExpiredContext { .. } => "the certificate has expired".into(),
        E::NotValidYet | E::NotValidYetContext { .. } => "the certificate is not valid yet".into(),
        E::Revoked => "the certificate is revoked".into(),
        E::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            "a CA certificate was presented as the server's own certificate".into()
        }
        other => format!("{other:?}"),
    }
}

fn map_error(e: &rustls::Error) -> Error {
    match e {
        rustls::Error::AlertReceived(alert) => Error::AlertReceived(Alert(u8::from(*alert))),
        rustls::Error::InvalidCertificate(reason) => Error::Verification(certificate_error(reason)),
        rustls::Error::NoCertificatesPresented => {
            Error::Verification("the peer presented no certificate".into())
        }
        other => Error::Protocol(other.to_string()),
    }
}

impl RustlsSession {
    fn new(conn: Connection, server_name: Option<String>) -> Self {
        Self {
            conn,
            input: Vec::new(),
            output: Vec::new(),
            app_in: Vec::new(),
            early_in: Vec::new(),
            early_received: false,
            server_name,
            peer_closed: false,
        }
    }

    /// Move the plaintext rustls holds into `app_in`. Bounded by the records
    /// pushed, which `Session` bounds by its own per-session limits.
    fn drain_plaintext(&mut self) -> Result<(), Error> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match self.conn.reader().read(&mut buf) {
                Ok(0) => {
                    self.peer_closed = true;
                    return Ok(());
                }
                Ok(n) => self.app_in.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
        }
    }

    fn flush_output(&mut self) {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.output) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

impl TlsSession for RustlsSession {
    fn framing(&self) -> Framing {
        Framing::Tls
    }

    fn push_received(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    fn process(&mut self) -> Result<(), Error> {
        let mut reader = io::Cursor::new(std::mem::take(&mut self.input));
        let result = loop {
            if reader.position() as usize >= reader.get_ref().len() {
                // Nothing (more) to read: still let a fresh client emit its hello.
                break self
                    .conn
                    .process_new_packets()
                    .map(|_| ())
                    .map_err(|e| map_error(&e));
            }
            match self.conn.read_tls(&mut reader) {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(Error::Protocol(format!("reading records: {e}"))),
            }
            if let Err(e) = self.conn.process_new_packets() {
                break Err(map_error(&e));
            }
            // rustls holds a bounded amount of received plaintext: take it
            // after every read, so a long flight of records goes through.
            if !self.conn.is_handshaking() {
                if let Err(e) = self.drain_plaintext() {
                    break Err(e);
                }
            }
            if let Connection::Server(server) = &mut self.conn {
                if let Some(mut early) = server.early_data() {
                    let mut buf = Vec::new();
                    if early.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                        self.early_received = true;
                        self.early_in.extend_from_slice(&buf);
                    }
                }
            }
        };
        self.flush_output();
        result?;
        if !self.conn.is_handshaking() {
            self.drain_plaintext()?;
        }
        Ok(())
    }

    fn take_output(&mut self, out: &mut Vec<u8>) {
        self.flush_output();
        out.append(&mut self.output);
    }

    fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    fn write_application_data(&mut self, data: &[u8]) -> Result<(), Error> {
        use std::io::Write;
        // rustls buffers a bounded amount of plaintext: move the records out
        // whenever it is full, so that a message of any size goes through.
        let mut rest = data;
        while !rest.is_empty() {
            let written = self
                .conn
                .writer()
                .write(rest)
                .map_err(|e| Error::Protocol(e.to_string()))?;
            if written == 0 {
                let before = self.output.len();
                self.flush_output();
                if self.output.len() == before {
                    return Err(Error::Engine("rustls accepts no more application data".into()));
                }
            }
            rest = rest.get(written..).unwrap_or_default();
        }
        self.flush_output();
        Ok(())
    }

    fn read_application_data(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        out.append(&mut self.app_in);
        Ok(())
    }

    fn write_early_data(&mut self, data: &[u8]) -> Result<usize, Error> {
        use std::io::Write;
        let Connection::Client(client) = &mut self.conn else {
            return Err(Error::Protocol("only a client writes early data".into()));
        };
        match client.early_data() {
            Some(mut early) => {
                let limit = data.len().min(early.bytes_left());
                early
                    .write(&data[..limit])
                    .map_err(|e| Error::Protocol(e.to_string()))
            }
            None => Ok(0),
        }
    }

    fn read_early_data(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.early_in);
    }

    fn export_keying_material(
        &self,
        label: &[u8],
        context: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<(), Error> {
        self.conn
            .export_keying_material(out, label, context)
            .map(|_| ())
            .map_err(|e| Error::Export(e.to_string()))
    }

    fn handshake_info(&self) -> Option<HandshakeInfo> {
        if self.conn.is_handshaking() {
            return None;
        }
        let version = match self.conn.protocol_version()? {
            ProtocolVersion::TLSv1_3 => TlsVersion::Tls13,
            ProtocolVersion::TLSv1_2 => TlsVersion::Tls12,
            _ => return None,
        };
        let suite = CipherSuite(u16::from(self.conn.negotiated_cipher_suite()?.suite()));
        let peer = match self.conn.peer_certificates() {
            Some(chain) if !chain.is_empty() => {
                PeerIdentity::Certificates(chain.iter().map(|c| Certificate(c.to_vec())).collect())
            }
            _ => PeerIdentity::Anonymous,
        };
        let (server_name, early_data_accepted) = match &self.conn {
            Connection::Client(c) => (self.server_name.clone(), c.is_early_data_accepted()),
            Connection::Server(s) => (s.server_name().map(str::to_owned), self.early_received),
        };
        Some(HandshakeInfo {
            version,
            cipher_suite: suite,
            peer,
            server_name,
            // rustls cannot carry custom extensions: nothing was offered or answered.
            oscore_cids: NegotiatedCids::default(),
            cose_cids: NegotiatedCids::default(),
            resumed: self.conn.handshake_kind() == Some(HandshakeKind::Resumed),
            early_data_accepted,
        })
    }

    fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
        self.flush_output();
    }

    fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    fn retransmission_timeout(&self) -> Option<Duration> {
        None
    }

    fn handle_retransmission_timeout(&mut self) -> Result<(), Error> {
        Ok(())
    }
}
