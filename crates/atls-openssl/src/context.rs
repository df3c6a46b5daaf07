//! Building OpenSSL contexts from the engine-neutral configuration.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use atls_core::engine::{Capabilities, ClientEndpoint, Engine, ServerEndpoint, TlsSession};
use atls_core::{
    Certificate, CertifiedKey, CipherSuite, ClientConfig, ClientSessionParams, CommonConfig, ConnectionId,
    Error, Framing, NegotiatedCids, ServerConfig, ServerSessionParams, TlsVersion,
};
use openssl::ex_data::Index;
use openssl::pkey::PKey;
use openssl::ssl::{
    ExtensionContext, Ssl, SslAlert, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslRef,
    SslSession, SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;

use crate::session::OpenSslSession;

/// The OpenSSL engine (system libssl, 3.0 or newer).
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenSslEngine;

const ENGINE: &str = "openssl";

const DEFAULT_TLS12_SUITES: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:\
ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-CCM:ECDHE-ECDSA-AES256-CCM:ECDHE-ECDSA-AES128-CCM8:\
ECDHE-ECDSA-AES256-CCM8:ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:\
PSK-CHACHA20-POLY1305:PSK-AES128-CCM:PSK-AES256-CCM:PSK-AES128-CCM8:PSK-AES256-CCM8";
const DEFAULT_TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_CCM_SHA256";

/// Per-SSL ATLS state shared with the extension and PSK callbacks.
#[derive(Debug, Default)]
pub(crate) struct AtlsState {
    pub(crate) oscore: NegotiatedCids,
    pub(crate) cose: NegotiatedCids,
    /// The identity of the external PSK the PSK callback supplied in this
    /// handshake (a client offers it, a server accepted it).
    pub(crate) psk_identity: Option<Vec<u8>>,
    pub(crate) server_name: Option<String>,
    /// DTLS server: the cookie of this session's HelloVerifyRequest.
    pub(crate) cookie: Option<Vec<u8>>,
    /// Client: the names the server's certificate carries, kept when it
    /// does not name the server (for an error that says which it names).
    pub(crate) presented_names: std::sync::Mutex<Option<Vec<String>>>,
}

/// The DNS names and IP addresses of a certificate's subjectAltName.
fn certificate_names(cert: &openssl::x509::X509Ref) -> Vec<String> {
    cert.subject_alt_names()
        .map(|sans| {
            sans.iter()
                .filter_map(|n| {
                    n.dnsname().map(str::to_owned).or_else(|| {
                        n.ipaddress().and_then(|ip| {
                            <[u8; 4]>::try_from(ip)
                                .map(|a| std::net::Ipv4Addr::from(a).to_string())
                                .or_else(|_| {
                                    <[u8; 16]>::try_from(ip).map(|a| std::net::Ipv6Addr::from(a).to_string())
                                })
                                .ok()
                        })
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn state_index() -> Index<Ssl, AtlsState> {
    static INDEX: OnceLock<Index<Ssl, AtlsState>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index allocation"))
}

fn config_error(what: &str) -> impl Fn(openssl::error::ErrorStack) -> Error + '_ {
    move |e| Error::Config(format!("{what}: {e}"))
}

fn x509(cert: &Certificate) -> Result<X509, Error> {
    X509::from_der(&cert.0).map_err(config_error("certificate"))
}

fn set_identity(builder: &mut SslContextBuilder, identity: &CertifiedKey) -> Result<(), Error> {
    let (leaf, rest) = identity
        .chain
        .split_first()
        .ok_or_else(|| Error::Config("empty certificate chain".into()))?;
    let leaf = x509(leaf)?;
    builder
        .set_certificate(&leaf)
        .map_err(config_error("certificate"))?;
    for cert in rest {
        builder
            .add_extra_chain_cert(x509(cert)?)
            .map_err(config_error("chain certificate"))?;
    }
    let key = PKey::private_key_from_der(identity.key.dangerous_der())
        .or_else(|_| PKey::private_key_from_pkcs8(identity.key.dangerous_der()))
        .map_err(config_error("private key"))?;
    builder
        .set_private_key(&key)
        .map_err(config_error("private key"))?;
    builder
        .check_private_key()
        .map_err(config_error("certificate and key do not match"))
}

fn trust_store(roots: &[Certificate]) -> Result<openssl::x509::store::X509Store, Error> {
    let mut store = X509StoreBuilder::new().map_err(config_error("trust store"))?;
    for root in roots {
        store
            .add_cert(x509(root)?)
            .map_err(config_error("trust anchor"))?;
    }
    Ok(store.build())
}

fn ssl_version(v: TlsVersion) -> SslVersion {
    match v {
        TlsVersion::Tls12 => SslVersion::TLS1_2,
        TlsVersion::Tls13 => SslVersion::TLS1_3,
        TlsVersion::Dtls12 => SslVersion::DTLS1_2,
    }
}

/// Method, versions, cipher suites, extensions, resumption: what client and server share.
fn common_builder(common: &CommonConfig) -> Result<SslContextBuilder, Error> {
    let framing = common.framing()?;
    let method = match framing {
        Framing::Tls => SslMethod::tls(),
        Framing::Dtls => SslMethod::dtls(),
    };
    let mut builder = SslContextBuilder::new(method).map_err(config_error("SSL context"))?;
    // A session between flights holds no record buffers (about 34 KiB that
    // OpenSSL otherwise keeps per connection): sessions wait for their next
    // flight far longer than they work on one.
    builder.set_mode(SslMode::RELEASE_BUFFERS);
    let mut versions = common.versions.clone();
    versions.sort();

    let (tls13, tls12): (Vec<CipherSuite>, Vec<CipherSuite>) = match &common.cipher_suites {
        Some(list) => list.iter().partition(|s| s.is_tls13()),
        None => (Vec::new(), Vec::new()),
    };
    if let Some(list) = &common.cipher_suites {
        for suite in list {
            if suite.name().is_none() {
                return Err(Error::Config(format!("unknown cipher suite {suite}")));
            }
        }
    }
    let tls13_list = match &common.cipher_suites {
        None => DEFAULT_TLS13_SUITES.to_owned(),
        Some(_) => tls13
            .iter()
            .filter_map(|s| s.name())
            .collect::<Vec<_>>()
            .join(":"),
    };
    let tls12_list = match &common.cipher_suites {
        None => DEFAULT_TLS12_SUITES.to_owned(),
        Some(_) => tls12
            .iter()
            .filter_map(|s| s.name())
            .map(openssl::ssl::cipher_name)
            .filter(|n| *n != "(NONE)")
            .collect::<Vec<_>>()
            .join(":"),
    };
    let wants_tls12 = versions.iter().any(|v| *v != TlsVersion::Tls13);
    let wants_tls13 = versions.contains(&TlsVersion::Tls13);
    if wants_tls12 && tls12_list.is_empty() && !wants_tls13 {
        return Err(Error::Config("no usable TLS 1.2 cipher suite configured".into()));
    }
    if wants_tls12 && tls12_list.is_empty() {
        versions.retain(|v| *v == TlsVersion::Tls13);
    }
    if wants_tls13 && tls13_list.is_empty() {
        versions.retain(|v| *v != TlsVersion::Tls13);
    }
    let (Some(min), Some(max)) = (versions.first(), versions.last()) else {
        return Err(Error::Config(
            "the configured cipher suites leave no usable version".into(),
        ));
    };
    builder
        .set_min_proto_version(Some(ssl_version(*min)))
        .map_err(config_error("protocol version"))?;
    builder
        .set_max_proto_version(Some(ssl_version(*max)))
        .map_err(config_error("protocol version"))?;
    if !tls12_list.is_empty() {
        builder
            .set_cipher_list(&tls12_list)
            .map_err(config_error("TLS 1.2 cipher suites"))?;
    }
    if framing == Framing::Tls {
        builder
            .set_ciphersuites(&tls13_list)
            .map_err(config_error("TLS 1.3 cipher suites"))?;
    }
    if framing == Framing::Dtls {
        builder.set_options(SslOptions::NO_QUERY_MTU);
    }
    if !common.resumption {
        builder.set_options(SslOptions::NO_TICKET);
        builder.set_session_cache_mode(SslSessionCacheMode::OFF);
        builder.set_num_tickets(0).map_err(config_error("tickets"))?;
    }
    add_cid_extension::<OscoreExtension>(&mut builder, common.extensions.oscore_code_point)?;
    add_cid_extension::<CoseExtension>(&mut builder, common.extensions.cose_code_point)?;
    Ok(builder)
}

/// The (D)TLS 1.2 PSK suites of `common`, as an OpenSSL cipher list.
fn psk_suites(common: &CommonConfig) -> String {
    let names: Vec<String> = match &common.cipher_suites {
        None => DEFAULT_TLS12_SUITES.split(':').map(str::to_owned).collect(),
        Some(list) => list
            .iter()
            .filter(|s| !s.is_tls13())
            .filter_map(|s| s.name())
            .map(|n| openssl::ssl::cipher_name(n).to_owned())
            .collect(),
    };
    names
        .into_iter()
        .filter(|n| n.contains("PSK"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Selects which of the two §11 extensions a registration serves.
///
/// `SslContextBuilder::add_custom_ext` stores its callbacks keyed by their
/// closure type, so the two registrations must instantiate distinct closure
/// types: a generic function per extension does that.
trait CidExtension: 'static {
    fn cids(state: &mut AtlsState) -> &mut NegotiatedCids;
}

struct OscoreExtension;
struct CoseExtension;

impl CidExtension for OscoreExtension {
    fn cids(state: &mut AtlsState) -> &mut NegotiatedCids {
        &mut state.oscore
    }
}

impl CidExtension for CoseExtension {
    fn cids(state: &mut AtlsState) -> &mut NegotiatedCids {
        &mut state.cose
    }
}

/// Register one §11 extension. The client offers its CID in ClientHello; the
/// server answers in ServerHello (TLS/DTLS 1.2) or EncryptedExtensions (TLS
/// 1.3), and only when the client offered.
fn add_cid_extension<K: CidExtension>(builder: &mut SslContextBuilder, code_point: u16) -> Result<(), Error> {
    let contexts = ExtensionContext::CLIENT_HELLO
        | ExtensionContext::TLS1_2_SERVER_HELLO
        | ExtensionContext::TLS1_3_ENCRYPTED_EXTENSIONS;
    builder
        .add_custom_ext(
            code_point,
            contexts,
            move |ssl: &mut SslRef, context, _| -> Result<Option<Vec<u8>>, SslAlert> {
                let Some(state) = ssl.ex_data_mut(state_index()) else {
                    return Ok(None);
                };
                let cids = K::cids(state);
                if !context.contains(ExtensionContext::CLIENT_HELLO) && cids.peer.is_none() {
                    return Ok(None);
                }
                Ok(cids.own.as_ref().map(ConnectionId::encode))
            },
            move |ssl: &mut SslRef, _context, data: &[u8], _| -> Result<(), SslAlert> {
                let cid = ConnectionId::decode(data).ok_or(SslAlert::DECODE_ERROR)?;
                if let Some(state) = ssl.ex_data_mut(state_index()) {
                    K::cids(state).peer = Some(cid);
                }
                Ok(())
            },
        )
        .map_err(config_error("ATLS extension"))
}

type SessionCache = Arc<Mutex<HashMap<String, Vec<SslSession>>>>;
const MAX_CACHED_SERVERS: usize = 256;
const MAX_TICKETS_PER_SERVER: usize = 4;

/// A client endpoint: one SSL_CTX and a resumption cache keyed by server name.
pub(crate) struct OpenSslClient {
    context: SslContext,
    config: ClientConfig,
    cache: SessionCache,
}

impl fmt::Debug for OpenSslClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenSslClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A server endpoint: one SSL_CTX.
pub(crate) struct OpenSslServer {
    context: SslContext,
    config: ServerConfig,
}

impl fmt::Debug for OpenSslServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenSslServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Engine for OpenSslEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            versions: &[TlsVersion::Tls12, TlsVersion::Tls13, TlsVersion::Dtls12],
            psk: true,
            atls_extensions: true,
            early_data: true,
        }
    }

    fn client(&self, config: &ClientConfig) -> Result<Arc<dyn ClientEndpoint>, Error> {
        let mut builder = common_builder(&config.common)?;
        if config.trust_anchors.is_empty() && config.psk.is_none() {
            return Err(Error::Config("a client needs trust anchors or a PSK".into()));
        }
        builder.set_verify_callback(SslVerifyMode::PEER, |ok, ctx| {
            // X509_V_ERR_HOSTNAME_MISMATCH (62) on the server's own
            // certificate: keep the names it carries for the error.
            if !ok && ctx.error().as_raw() == 62 && ctx.error_depth() == 0 {
                let names = ctx.current_cert().map(certificate_names).unwrap_or_default();
                let ssl = openssl::x509::X509StoreContext::ssl_idx()
                    .ok()
                    .and_then(|idx| ctx.ex_data(idx));
                if let Some(state) = ssl.and_then(|ssl| ssl.ex_data(state_index())) {
                    if let Ok(mut kept) = state.presented_names.lock() {
                        *kept = Some(names);
                    }
                }
            }
            ok
        });
        builder.set_cert_store(trust_store(&config.trust_anchors)?);
        if config.trust_anchors.is_empty() && config.common.versions.iter().any(|v| *v != TlsVersion::Tls13) {
            // PSK only: offer no (D)TLS 1.2 suite that a server would answer
            // with a certificate this client cannot verify.
            let psk_only = psk_suites(&config.common);
            if psk_only.is_empty() {
                return Err(Error::Config("no PSK cipher suite configured".into()));
            }
            builder
                .set_cipher_list(&psk_only)
                .map_err(config_error("TLS 1.2 PSK cipher suites"))?;
        }
        if let Some(identity) = &config.client_auth {
            set_identity(&mut builder, identity)?;
        }
        if let Some(psk) = config.psk.clone() {
            builder.set_psk_client_callback(move |ssl, _hint, identity_out, key_out| {
                let id = &psk.identity;
                let key = psk.dangerous_key();
                if id.len() >= identity_out.len() || key.len() > key_out.len() {
                    return Ok(0);
                }
                identity_out[..id.len()].copy_from_slice(id);
                identity_out[id.len()] = 0;
                key_out[..key.len()].copy_from_slice(key);
                if let Some(state) = ssl.ex_data_mut(state_index()) {
                    state.psk_identity = Some(id.clone());
                }
                Ok(key.len())
            });
        }
        let cache: SessionCache = Arc::default();
        if config.common.resumption {
            builder.set_session_cache_mode(SslSessionCacheMode::CLIENT);
            let store = Arc::clone(&cache);
            builder.set_new_session_callback(move |ssl, session| {
                let name = ssl
                    .ex_data(state_index())
                    .and_then(|s| s.server_name.clone())
                    .unwrap_or_default();
                if let Ok(mut cache) = store.lock() {
                    if cache.len() >= MAX_CACHED_SERVERS && !cache.contains_key(&name) {
                        cache.clear();
                    }
                    let tickets = cache.entry(name).or_default();
                    if tickets.len() >= MAX_TICKETS_PER_SERVER {
                        tickets.remove(0);
                    }
                    tickets.push(session);
                }
            });
        }
        Ok(Arc::new(OpenSslClient {
            context: builder.build(),
            config: config.clone(),
            cache,
        }))
    }

    fn server(&self, config: &ServerConfig) -> Result<Arc<dyn ServerEndpoint>, Error> {
        let mut builder = common_builder(&config.common)?;
        match &config.identity {
            Some(identity) => set_identity(&mut builder, identity)?,
            None if config.psks.is_empty() => {
                return Err(Error::Config("a server needs a certificate or PSKs".into()))
            }
            None => {}
        }
        // OpenSSL refuses to resume a session of a server that verifies
        // peers unless the sessions carry an ID context.
        builder
            .set_session_id_context(b"atls")
            .map_err(config_error("session ID context"))?;
        if let Some(roots) = &config.client_auth_roots {
            builder.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            builder.set_cert_store(trust_store(roots)?);
            for root in roots {
                let root = x509(root)?;
                builder.add_client_ca(&root).map_err(config_error("client CA"))?;
            }
        }
        if !config.psks.is_empty() {
            let psks: HashMap<Vec<u8>, atls_core::Psk> = config
                .psks
                .iter()
                .map(|p| (p.identity.clone(), p.clone()))
                .collect();
            builder.set_psk_server_callback(move |ssl, identity, key_out| {
                let Some(psk) = identity.and_then(|id| psks.get(id)) else {
                    return Ok(0);
                };
                let key = psk.dangerous_key();
                if key.len() > key_out.len() {
                    return Ok(0);
                }
                key_out[..key.len()].copy_from_slice(key);
                if let Some(state) = ssl.ex_data_mut(state_index()) {
                    state.psk_identity = Some(psk.identity.clone());
                }
                Ok(key.len())
            });
            if config.common.resumption && !crate::sys::install_ticket_psk_identity(&mut builder) {
                return Err(Error::Config("session ticket callback".into()));
            }
        }
        if config.common.framing()? == Framing::Dtls && config.common.dtls.cookie_exchange {
            // One random cookie per session, kept in the session: the state
            // exists already (a memory-BIO session per peer), what the
            // exchange adds is that an unverified peer gets a small answer
            // and no key exchange.
            builder.set_options(SslOptions::COOKIE_EXCHANGE);
            builder.set_cookie_generate_cb(|ssl, out| {
                let state = ssl.ex_data_mut(state_index());
                let cookie = match state.as_ref().and_then(|s| s.cookie.clone()) {
                    Some(cookie) => cookie,
                    None => {
                        let mut cookie = vec![0u8; 16];
                        openssl::rand::rand_bytes(&mut cookie)?;
                        cookie
                    }
                };
                let n = cookie.len().min(out.len());
                out[..n].copy_from_slice(&cookie[..n]);
                if let Some(state) = ssl.ex_data_mut(state_index()) {
                    state.cookie = Some(cookie);
                }
                Ok(n)
            });
            builder.set_cookie_verify_cb(|ssl, cookie| {
                ssl.ex_data(state_index())
                    .and_then(|s| s.cookie.as_deref())
                    // memcmp::eq panics on different lengths.
                    .is_some_and(|ours| cookie.len() == ours.len() && openssl::memcmp::eq(ours, cookie))
            });
        }
        if config.max_early_data > 0 && config.common.resumption {
            builder
                .set_max_early_data(config.max_early_data)
                .map_err(config_error("early data"))?;
        }
        Ok(Arc::new(OpenSslServer {
            context: builder.build(),
            config: config.clone(),
        }))
    }
}

impl ClientEndpoint for OpenSslClient {
    fn start(&self, params: &ClientSessionParams) -> Result<Box<dyn TlsSession>, Error> {
        let mut ssl = Ssl::new(&self.context).map_err(|e| Error::Engine(e.to_string()))?;
        ssl.set_connect_state();
        if let Some(name) = &params.server_name {
            match name.parse::<std::net::IpAddr>() {
                Ok(ip) => ssl
                    .param_mut()
                    .set_ip(ip)
                    .map_err(config_error("server address"))?,
                Err(_) => {
                    ssl.set_hostname(name).map_err(config_error("server name"))?;
                    ssl.param_mut()
                        .set_host(name)
                        .map_err(config_error("server name"))?;
                }
            }
        }
        let name = params.server_name.clone().unwrap_or_default();
        if self.config.common.resumption {
            // TLS 1.3 tickets are used once (RFC 8446 §C.4); a TLS 1.2 session
            // is reused as is, and OpenSSL reports no new one after resuming it.
            let resumable = self.cache.lock().ok().and_then(|mut cache| {
                let tickets = cache.get_mut(&name)?;
                match tickets.last()?.protocol_version() {
                    SslVersion::TLS1_3 => tickets.pop(),
                    _ => tickets.last().map(|s| s.to_owned()),
                }
            });
            if let Some(session) = resumable {
                // SAFETY: the session came from this endpoint's own SSL_CTX.
                #[allow(unsafe_code)]
                unsafe {
                    ssl.set_session(&session)
                        .map_err(|e| Error::Engine(e.to_string()))?;
                }
            }
        }
        ssl.set_ex_data(
            state_index(),
            AtlsState {
                oscore: NegotiatedCids {
                    own: params.oscore_cid.clone(),
                    peer: None,
                },
                cose: NegotiatedCids {
                    own: params.cose_cid.clone(),
                    peer: None,
                },
                psk_identity: None,
                cookie: None,
                presented_names: std::sync::Mutex::new(None),
                server_name: params.server_name.clone(),
            },
        );
        OpenSslSession::boxed(ssl, &self.config.common, true, self.config.early_data)
    }

    fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }
}

impl ServerEndpoint for OpenSslServer {
    fn accept(&self, params: &ServerSessionParams) -> Result<Box<dyn TlsSession>, Error> {
        let mut ssl = Ssl::new(&self.context).map_err(|e| Error::Engine(e.to_string()))?;
        ssl.set_accept_state();
        ssl.set_ex_data(
            state_index(),
            AtlsState {
                oscore: NegotiatedCids {
                    own: params.oscore_cid.clone(),
                    peer: None,
                },
                cose: NegotiatedCids {
                    own: params.cose_cid.clone(),
                    peer: None,
                },
                psk_identity: None,
                cookie: params.dtls_cookie.clone(),
                server_name: None,
                presented_names: std::sync::Mutex::new(None),
            },
        );
        let early = self.config.max_early_data > 0 && self.config.common.resumption;
        OpenSslSession::boxed(ssl, &self.config.common, false, early)
    }

    fn config(&self) -> &ServerConfig {
        &self.config
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }
}
