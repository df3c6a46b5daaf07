//! The untrusted CoAP-to-HTTP gateway of draft-friel-tls-atls Figure 9.
//!
//! Devices speak CoAP to the gateway — over UDP, TCP (RFC 8323) or DTLS
//! (`coaps://`) — and the gateway speaks HTTP or HTTPS to services. It
//! forwards what it cannot read:
//!
//! - **ATLS flights**: `POST /.well-known/atls` with the ATLS
//!   Content-Format (reassembled from Block1 blocks) becomes `POST
//!   {service}/.well-known/atls` with `Content-Type: application/atls`; a
//!   `200` answer becomes `2.04 Changed` with the flight (in Block2 blocks
//!   when it does not fit one message);
//! - **OSCORE messages** (RFC 8613 §11.2/§11.3): a CoAP request with the
//!   OSCORE option becomes `POST` with `Content-Type: application/oscore`
//!   and the `OSCORE` header, to the service named by Proxy-Uri (or
//!   Proxy-Scheme and Uri-Host), or else to the device's service.
//!
//! Each device (CoAP endpoint) has its own cookie store and its own
//! upstream connection pool (§5.1.5), so the service tells devices apart as
//! it tells browsers apart. With several services (`routes`), the SNI of a
//! device's ClientHello chooses its service (§5.1.5). Anything that is not
//! an ATLS flight (records that parse as TLS or DTLS) or an OSCORE message
//! is refused with 4.03 (§5.1.2). What the gateway logs is what a middlebox
//! may see: content types, sizes, record types, SNI.
//!
//! Upstream faults become CoAP errors: unreachable or garbage is 5.02,
//! slower than `upstream_timeout` is 5.04. State per device is bounded
//! ([`GatewayConfig`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod devices;
mod upstream;

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use atls_coap::block::{block1_step, block2_slice, block_error, Block1Step, BlockError, BlockValue};
use atls_coap::echo::EchoGuard;
use atls_coap::handler::{Answer, CoapHandler};
use atls_coap::message::{answer, diagnostic, is_atls_path, parse_request, read_uint, uint_option};
use atls_coap::server::{Endpoint, Transport, CONTENT_FORMAT_MULTIPART_CORE};
use atls_core::records::{self, FirstFlight};
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use crate::devices::{Bounds, Devices, NoRoom};
pub use crate::upstream::coap_code;

/// A service the gateway forwards to, chosen by the SNI of a device's
/// ClientHello.
#[derive(Clone, PartialEq, Eq)]
pub struct Route {
    /// The server name (SNI) that selects it.
    pub name: String,
    /// Its base URL (scheme, authority, optional path prefix).
    pub upstream: reqwest::Url,
}

/// URLs redacted: a service's URL may carry its password.
impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("upstream", &atls_http::app::redact_url(self.upstream.as_str()))
            .finish()
    }
}

/// Settings of a [`Gateway`].
#[derive(Clone)]
pub struct GatewayConfig {
    /// Services by SNI (§5.1.5).
    pub routes: Vec<Route>,
    /// The service of a device whose ClientHello names none of `routes`
    /// (or no name at all). Without it such a device gets 4.04.
    pub default_upstream: Option<reqwest::Url>,
    /// Content-Format number of ATLS payloads.
    pub content_format: u16,
    /// Block size of Block2 answers over UDP and DTLS (16..=1024).
    pub block_size: usize,
    /// Largest flight forwarded, either way.
    pub max_flight: usize,
    /// Largest OSCORE message forwarded, either way.
    pub max_message: usize,
    /// Devices remembered at once.
    pub max_devices: usize,
    /// Devices remembered per IP address (IPv6: per /64). Each device of a
    /// host behind the gateway's devices' own NAT is a port of it.
    pub max_devices_per_ip: usize,
    /// Upstream requests in progress at once, over all devices.
    pub max_upstream_requests: usize,
    /// Upstream requests in progress at once for one device.
    pub max_requests_per_device: usize,
    /// Upstream requests in progress at once to one service.
    pub max_requests_per_service: usize,
    /// Upstream requests in progress at once from one IP address (IPv6:
    /// one /64), over all its devices.
    pub max_requests_per_ip: usize,
    /// Established devices that keep an upstream connection pool of their
    /// own (the least recently seen lose theirs beyond it); devices
    /// without one open a connection per exchange.
    pub max_pooled_devices: usize,
    /// A device that has not completed a handshake is forgotten after this
    /// long without a message.
    pub handshake_timeout: Duration,
    /// An established device is forgotten after this long without a message.
    pub idle_timeout: Duration,
    /// A Block1 upload or a Block2 answer not continued for this long is
    /// dropped.
    pub transfer_timeout: Duration,
    /// How long the service may take to answer (then 5.04).
    pub upstream_timeout: Duration,
    /// How long connecting to the service may take (then 5.02).
    pub upstream_connect_timeout: Duration,
    /// The transport layer towards the services (HTTPS): its trust anchors
    /// (besides the public roots), the gateway's client certificate,
    /// versions — the gateway's own, apart from the devices' DTLS hop and
    /// from ATLS (of which the gateway has no configuration at all).
    pub upstream_tls: atls_http::TransportTls,
    /// An HTTP forward proxy for every upstream request.
    pub upstream_proxy: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            default_upstream: None,
            content_format: atls_coap::CONTENT_FORMAT_ATLS,
            block_size: 512,
            max_flight: 64 * 1024,
            max_message: 64 * 1024,
            max_devices: 4096,
            max_devices_per_ip: 256,
            max_upstream_requests: 256,
            max_requests_per_device: 4,
            max_requests_per_service: 128,
            max_requests_per_ip: 64,
            max_pooled_devices: 512,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            transfer_timeout: BLOCK2_LIFETIME,
            upstream_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_tls: atls_http::TransportTls::default(),
            upstream_proxy: None,
        }
    }
}

/// Why a gateway cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration is not usable.
    #[error("gateway configuration: {0}")]
    Config(String),
}

/// What the gateway holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Devices remembered.
    pub devices: usize,
    /// Of which have not completed a handshake.
    pub half_open: usize,
    /// Of which have.
    pub established: usize,
    /// Upstream requests in progress.
    pub upstream_in_flight: usize,
    /// Block1 uploads in progress.
    pub block1_transfers: usize,
    /// Bytes of answers held for Block2 follow-ups.
    pub block2_bytes: usize,
}

/// What the gateway could read of one forwarded exchange: what any
/// middlebox on the path may legitimately see (§5.1.2, §5.1.4).
#[derive(Clone, Debug)]
pub struct Observation {
    /// The device.
    pub device: SocketAddr,
    /// Its transport.
    pub transport: Transport,
    /// `"flight"` or `"oscore"`.
    pub kind: &'static str,
    /// The SNI of the device's ClientHello, if it named one.
    pub sni: Option<String>,
    /// Where it was forwarded.
    pub upstream: String,
    /// The payload forwarded (TLS records, or the OSCORE ciphertext).
    pub request: Vec<u8>,
    /// The service's status, if it answered.
    pub status: Option<u16>,
    /// The answer's content type.
    pub response_type: Option<String>,
    /// The answer's body.
    pub response: Vec<u8>,
    /// The CoAP code the device got.
    pub code: String,
}

/// Called with each [`Observation`].
pub type Observer = Arc<dyn Fn(&Observation) + Send + Sync>;

/// Block1 uploads in progress at once over all devices.
const MAX_BLOCK1_TRANSFERS: usize = atls_coap::block::MAX_BLOCK1_TRANSFERS;
/// Block1 uploads in progress at once from one address prefix.
const MAX_BLOCK1_PER_PREFIX: usize = 8;
/// Bytes of answers held for Block2 follow-ups over all devices.
const MAX_BLOCK2_BYTES: usize = 16 * 1024 * 1024;
/// A Block2 answer not fetched for this long is dropped.
const BLOCK2_LIFETIME: Duration = Duration::from_secs(60);
/// Largest OSCORE answer sent in one datagram (RFC 7252 §4.6).
const MAX_DATAGRAM_MESSAGE: usize = 1152;

/// The gateway: a [`CoapHandler`] for the transport loops of `atls-coap`
/// ([`atls_coap::udp::serve`], [`atls_coap::tcp::serve`],
/// [`atls_coap::dtls::serve`]).
pub struct Gateway {
    inner: Arc<Inner>,
}

/// URLs redacted; the bounds as they are.
impl fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |u: &str| atls_http::app::redact_url(u);
        f.debug_struct("GatewayConfig")
            .field("routes", &self.routes)
            .field(
                "default_upstream",
                &self.default_upstream.as_ref().map(|u| redact(u.as_str())),
            )
            .field("upstream_proxy", &self.upstream_proxy.as_deref().map(redact))
            .field("max_devices", &self.max_devices)
            .field("max_devices_per_ip", &self.max_devices_per_ip)
            .field("max_upstream_requests", &self.max_upstream_requests)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("upstream_timeout", &self.upstream_timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config's own Debug redacts the services' URLs.
        f.debug_struct("Gateway")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: GatewayConfig,
    pub(crate) bounds: Bounds,
    pub(crate) tls: rustls::ClientConfig,
    /// The upstream client of devices without a pool of their own.
    pub(crate) unpooled: reqwest::Client,
    pub(crate) devices: Mutex<Devices>,
    /// Upstream requests in progress per route and per address prefix.
    route_load: Mutex<Loads>,
    echo: EchoGuard,
    pub(crate) observer: Option<Observer>,
    /// Shutting down: no new exchanges.
    draining: std::sync::atomic::AtomicBool,
}

/// Upstream requests in progress per route (`None`: the default) and per
/// device address prefix.
#[derive(Default)]
pub(crate) struct Loads {
    route: std::collections::HashMap<Option<usize>, usize>,
    prefix: std::collections::HashMap<atls_sessions::ClientKey, usize>,
}

/// One upstream request in progress: dropped when it ends — answered,
/// failed, or its task cancelled or panicking — it gives back its slots.
pub(crate) struct InFlight {
    inner: Arc<Inner>,
    endpoint: Endpoint,
    route: Option<usize>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.inner.devices).release(&self.endpoint);
        let mut load = lock(&self.inner.route_load);
        if let Some(n) = load.route.get_mut(&self.route) {
            *n = n.saturating_sub(1);
        }
        let prefix = atls_sessions::ClientKey::from(self.endpoint.addr.ip());
        if let Some(n) = load.prefix.get_mut(&prefix) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                load.prefix.remove(&prefix);
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What becomes of one request.
pub(crate) enum Step {
    /// Answered by the gateway itself.
    Now(Packet),
    /// Forwarded.
    Upstream(Box<upstream::Call>),
}

impl Gateway {
    /// A gateway with `config`.
    pub fn new(config: GatewayConfig) -> Result<Arc<Self>, GatewayError> {
        Self::build(config, None)
    }

    /// A gateway with `config` that hands `observer` what it could read of
    /// each forwarded exchange.
    pub fn with_observer(config: GatewayConfig, observer: Observer) -> Result<Arc<Self>, GatewayError> {
        Self::build(config, Some(observer))
    }

    fn build(config: GatewayConfig, observer: Option<Observer>) -> Result<Arc<Self>, GatewayError> {
        if config.routes.is_empty() && config.default_upstream.is_none() {
            return Err(GatewayError::Config(
                "no service: give a route or a default upstream".into(),
            ));
        }
        for url in config
            .routes
            .iter()
            .map(|r| &r.upstream)
            .chain(config.default_upstream.as_ref())
        {
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(GatewayError::Config(format!(
                    "upstream {url} is not an http(s) URL"
                )));
            }
        }
        if !(16..=1024).contains(&config.block_size) || !config.block_size.is_power_of_two() {
            return Err(GatewayError::Config(
                "block size must be a power of two in 16..=1024".into(),
            ));
        }
        let tls = atls_http::client::transport_tls_config(&config.upstream_tls)
            .map_err(|e| GatewayError::Config(e.to_string()))?;
        let bounds = Bounds {
            max_devices: config.max_devices,
            max_per_prefix: config.max_devices_per_ip,
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            transfer_timeout: config.transfer_timeout,
        };
        let unpooled = upstream::unpooled_client(&tls, &config).map_err(GatewayError::Config)?;
        Ok(Arc::new(Self {
            inner: Arc::new(Inner {
                config,
                bounds,
                tls,
                unpooled,
                devices: Mutex::new(Devices::default()),
                route_load: Mutex::default(),
                echo: EchoGuard::new(),
                observer,
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        }))
    }

    /// Stop taking new exchanges (they get 5.03 Service Unavailable) while
    /// those in progress finish: wait for [`GatewayStats::upstream_in_flight`],
    /// [`GatewayStats::block1_transfers`] and [`GatewayStats::block2_bytes`]
    /// to reach 0, then stop the listeners. Block2 and Block1 follow-ups
    /// of transfers under way are still served.
    pub fn drain(&self) {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The gateway's settings.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// Forget devices whose time is up (also done as messages arrive; a
    /// server loop calls this once a second so that an idle gateway lets
    /// go of them too).
    pub fn sweep(&self, now: Instant) {
        lock(&self.inner.devices).sweep(now, &self.inner.bounds);
    }

    /// What the gateway holds, after a [`sweep`](Self::sweep).
    pub fn stats(&self, now: Instant) -> GatewayStats {
        let mut devices = lock(&self.inner.devices);
        devices.sweep(now, &self.inner.bounds);
        let (half_open, established) = devices.counts();
        GatewayStats {
            devices: devices.len(),
            half_open,
            established,
            upstream_in_flight: devices.in_flight,
            block1_transfers: devices.transfers,
            block2_bytes: devices.block2_bytes,
        }
    }
}

fn unavailable(request: &Packet, text: &str, max_age: u64) -> Packet {
    let mut p = diagnostic(request, ResponseType::ServiceUnavailable, text);
    p.add_option(CoapOption::MaxAge, uint_option(max_age));
    p
}

/// The value an admission step gave, or the answer that refuses the
/// request: no service for the device (`Err(None)`), a bound reached
/// (`Err(Some(why))`), the device forgotten meanwhile, or no room for it.
type Admission<T> = Result<Option<Result<T, Option<&'static str>>>, NoRoom>;

fn refusal<T>(request: &Packet, admitted: Admission<T>) -> Result<T, Packet> {
    match admitted {
        Ok(Some(Ok(found))) => Ok(found),
        Ok(Some(Err(None))) => Err(diagnostic(
            request,
            ResponseType::NotFound,
            "no service for this device",
        )),
        Ok(Some(Err(Some(why)))) => Err(unavailable(request, why, 1)),
        Ok(None) => Err(unavailable(request, "device state was dropped", 1)),
        Err(why) => Err(no_room(request, why)),
    }
}

fn no_room(request: &Packet, why: NoRoom) -> Packet {
    match why {
        NoRoom::PerAddress => unavailable(request, "too many devices from this address", 10),
        NoRoom::Full => unavailable(request, "the gateway serves too many devices", 10),
    }
}

impl Inner {
    /// The route a ClientHello's SNI chooses.
    fn route_for(&self, sni: Option<&str>) -> Option<Option<usize>> {
        let named = sni.and_then(|name| {
            self.config
                .routes
                .iter()
                .position(|r| r.name.eq_ignore_ascii_case(name))
        });
        match named {
            Some(i) => Some(Some(i)),
            None => self.config.default_upstream.as_ref().map(|_| None),
        }
    }

    /// The base URL of a route (`None`: the default upstream).
    pub(crate) fn base(&self, route: Option<usize>) -> Option<&reqwest::Url> {
        match route {
            Some(i) => self.config.routes.get(i).map(|r| &r.upstream),
            None => self.config.default_upstream.as_ref(),
        }
    }

    /// The route an OSCORE request names with Proxy-Uri, or with
    /// Proxy-Scheme and Uri-Host/Uri-Port (RFC 7252 §6.5): one of the
    /// configured services, never an arbitrary URL (the gateway is not an
    /// open proxy). Only the origin is taken from the device: the request
    /// goes to the path `/` of the service's own base URL (an OSCORE
    /// request's path is inner, RFC 8613 §4.1.3), and a URL with userinfo,
    /// a query or a fragment is refused. `Ok(None)`: it names no service.
    /// The routes of that origin, in order (several routes may share one
    /// origin under different paths; the device's own is preferred).
    fn proxy_target(&self, request: &Packet) -> Result<Option<Vec<Option<usize>>>, &'static str> {
        let text = |o: CoapOption| -> Result<Option<String>, &'static str> {
            request
                .get_first_option(o)
                .map(|v| String::from_utf8(v.clone()).map_err(|_| "a proxy option is not UTF-8"))
                .transpose()
        };
        let named = if let Some(uri) = text(CoapOption::ProxyUri)? {
            let url = reqwest::Url::parse(&uri).map_err(|_| "Proxy-Uri is not a URL")?;
            if !url.username().is_empty()
                || url.password().is_some()
                || url.query().is_some()
                || url.fragment().is_some()
            {
                return Err("Proxy-Uri with userinfo, a query or a fragment");
            }
            if !matches!(url.path(), "" | "/") {
                return Err("an OSCORE request's path is inner: Proxy-Uri names an origin only");
            }
            url
        } else if let Some(scheme) = text(CoapOption::ProxyScheme)? {
            if !matches!(scheme.as_str(), "http" | "https") {
                return Err("Proxy-Scheme must be http or https");
            }
            let host = text(CoapOption::UriHost)?.ok_or("Proxy-Scheme without Uri-Host")?;
            let bare = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
            if !bare {
                return Err("Uri-Host is not a host name or address");
            }
            let port = match request.get_first_option(CoapOption::UriPort) {
                None => String::new(),
                Some(v) => match read_uint(v).and_then(|p| u16::try_from(p).ok()) {
                    Some(p) => format!(":{p}"),
                    None => return Err("Uri-Port is not a port"),
                },
            };
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            reqwest::Url::parse(&format!("{scheme}://{host}{port}/"))
                .map_err(|_| "Proxy-Scheme and Uri-Host make no URL")?
        } else {
            return Ok(None);
        };
        let same_origin = |u: &reqwest::Url| u.origin() == named.origin();
        let mut routes: Vec<Option<usize>> = self
            .config
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| same_origin(&r.upstream))
            .map(|(i, _)| Some(i))
            .collect();
        if self.config.default_upstream.as_ref().is_some_and(same_origin) {
            routes.push(None);
        }
        if routes.is_empty() {
            return Err("not a service of this gateway");
        }
        Ok(Some(routes))
    }

    /// Decide what to do with one request from `from`; `whole` is the
    /// largest flight answer sent without Block2.
    fn process(self: &Arc<Self>, request: &Packet, from: Endpoint, now: Instant, whole: usize) -> Step {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) && !continues_transfer(request) {
            let mut answer = diagnostic(
                request,
                ResponseType::ServiceUnavailable,
                "the gateway is shutting down",
            );
            answer.add_option(CoapOption::MaxAge, vec![5]);
            return Step::Now(answer);
        }
        if let Some(option) = atls_coap::message::unknown_critical(request) {
            return Step::Now(diagnostic(
                request,
                ResponseType::BadOption,
                &format!("unknown critical option {option}"),
            ));
        }
        if is_atls_path(request) {
            return self.flight(request, from, now, whole);
        }
        if request.get_option(CoapOption::Oscore).is_some() {
            return self.oscore(request, from, now);
        }
        tracing::info!(
            device = %from.addr, transport = from.transport.scheme(), code = %request.header.code,
            bytes = request.payload.len(),
            "refused: neither an ATLS flight nor an OSCORE message"
        );
        metrics::counter!("atls_gateway_refused_total", "reason" => "not_atls").increment(1);
        Step::Now(diagnostic(
            request,
            ResponseType::Forbidden,
            "this gateway forwards only ATLS flights and OSCORE messages",
        ))
    }

    fn flight(self: &Arc<Self>, request: &Packet, from: Endpoint, now: Instant, whole: usize) -> Step {
        if request.header.code != MessageClass::Request(RequestType::Post) {
            return Step::Now(diagnostic(
                request,
                ResponseType::MethodNotAllowed,
                "ATLS flights are POSTed",
            ));
        }
        // A Block2 follow-up: the rest of the last answer.
        if let Some(value) = request.get_first_option(CoapOption::Block2) {
            let block2 = match BlockValue::decode(value) {
                Ok(b) => b,
                Err(e) => return Step::Now(block_error(request, e)),
            };
            if block2.num > 0 {
                return Step::Now(self.block2_follow_up(request, block2, from, now));
            }
        }
        let format = request
            .get_first_option(CoapOption::ContentFormat)
            .and_then(|v| read_uint(v));
        let multipart = format == Some(CONTENT_FORMAT_MULTIPART_CORE);
        if format != Some(u64::from(self.config.content_format)) && !multipart {
            return Step::Now(diagnostic(
                request,
                ResponseType::UnsupportedContentFormat,
                "expected the application/atls Content-Format",
            ));
        }
        let flight = match request.get_first_option(CoapOption::Block1) {
            None => request.payload.clone(),
            Some(value) => match self.block1(request, value, from, now) {
                Ok(Block1Step::Complete(body)) => body,
                Ok(Block1Step::Continue) => {
                    let mut p = answer(request, ResponseType::Continue);
                    p.add_option(CoapOption::Block1, value.clone());
                    return Step::Now(p);
                }
                Err(e) => return Step::Now(block_error(request, e)),
            },
        };
        let flight = if multipart {
            match atls_coap::multipart::atls_parts(&flight, self.config.content_format) {
                Ok(parts) => parts,
                Err(e) => return Step::Now(diagnostic(request, ResponseType::BadRequest, e)),
            }
        } else {
            flight
        };
        // §5.1.2: forward only what is recognisably TLS or DTLS records.
        let Some(framing) = records::detect_framing(&flight) else {
            return Step::Now(diagnostic(
                request,
                ResponseType::BadRequest,
                "the payload is not TLS records",
            ));
        };
        let hello = match records::split_records(framing, &flight) {
            Ok(records) => records::first_flight(framing, &records) == FirstFlight::ClientHello,
            Err(_) => {
                return Step::Now(diagnostic(
                    request,
                    ResponseType::BadRequest,
                    "the payload is not TLS records",
                ))
            }
        };
        let sni = if hello {
            atls_core::inspect::inspect(&flight)
                .client_hello()
                .and_then(|ch| ch.server_name.clone())
        } else {
            None
        };
        let chosen = if hello {
            match self.route_for(sni.as_deref()) {
                Some(route) => Some(route),
                None => {
                    tracing::info!(device = %from.addr, sni = sni.as_deref().unwrap_or("-"), "refused: no service for this server name");
                    metrics::counter!("atls_gateway_refused_total", "reason" => "no_route").increment(1);
                    return Step::Now(diagnostic(
                        request,
                        ResponseType::NotFound,
                        "no service for this server name",
                    ));
                }
            }
        } else {
            None
        };
        let admitted = lock(&self.devices).with(from, now, &self.bounds, true, |device, totals| {
            if hello {
                if device.routed && device.route != chosen.flatten() {
                    // Another service: its cookies are not the new one's
                    // business.
                    device.cookies = cookie_store::CookieStore::default();
                }
                // A new handshake: half-open again, so no pool of its own.
                device.http = None;
                device.route = chosen.flatten();
                device.sni = sni.clone();
                device.routed = true;
                device.exchanges = 0;
                device.established = false;
            } else if !device.routed {
                // Its handshake did not pass here (or it was forgotten
                // since): it must not be sent to some other service.
                return Err(None);
            }
            // The target is settled before the request is counted in
            // flight: nothing returns between admission and the exchange.
            let Some(base) = self.base(device.route).cloned() else {
                return Err(None);
            };
            self.admit(device, totals, device.route, from).map_err(Some)?;
            Ok((base, device.sni.clone(), device.route, device.epoch))
        });
        let (base, sni, route, epoch) = match refusal(request, admitted) {
            Ok(found) => found,
            Err(answer) => return Step::Now(answer),
        };
        Step::Upstream(Box::new(upstream::Call {
            _guard: InFlight {
                inner: self.clone(),
                endpoint: from,
                route,
            },
            epoch,
            endpoint: from,
            request: request.clone(),
            kind: upstream::Kind::Flight { body: flight, hello },
            cookies: true,
            url: upstream::join(&base, atls_http::wire::WELL_KNOWN_PATH),
            sni,
            whole,
        }))
    }

    fn oscore(self: &Arc<Self>, request: &Packet, from: Endpoint, now: Instant) -> Step {
        // Forward only what is an OSCORE message (RFC 8613 §6.1): a
        // well-formed option and a ciphertext at least a tag long.
        if atls_oscore::message::oscore_option(request).is_err() || request.payload.len() < 8 {
            tracing::info!(device = %from.addr, "refused: not an OSCORE message");
            metrics::counter!("atls_gateway_refused_total", "reason" => "not_oscore").increment(1);
            return Step::Now(diagnostic(
                request,
                ResponseType::BadOption,
                "not an OSCORE message",
            ));
        }
        let target = match self.proxy_target(request) {
            Ok(target) => target,
            Err(why) => {
                tracing::info!(device = %from.addr, why, "refused: OSCORE request for another service");
                metrics::counter!("atls_gateway_refused_total", "reason" => "not_a_service").increment(1);
                return Step::Now(diagnostic(request, ResponseType::ProxyingNotSupported, why));
            }
        };
        if request.payload.len() > self.config.max_message {
            return Step::Now(diagnostic(
                request,
                ResponseType::RequestEntityTooLarge,
                "the OSCORE message is too large",
            ));
        }
        // The target is settled before the request is counted in flight:
        // nothing returns between admission and the upstream exchange.
        let admitted = lock(&self.devices).with(from, now, &self.bounds, true, |device, totals| {
            let route = match &target {
                // The device's own route when it has that origin, else the
                // first of that origin.
                Some(routes) if device.routed && routes.contains(&device.route) => device.route,
                Some(routes) => routes.first().copied().flatten(),
                // No ClientHello of it passed here (or it was forgotten):
                // it must not be sent to some other service.
                None if !device.routed => return Err(None),
                None => device.route,
            };
            let Some(base) = self.base(route) else {
                return Err(None);
            };
            let url = upstream::join(base, "/");
            self.admit(device, totals, route, from).map_err(Some)?;
            Ok((
                url,
                device.sni.clone(),
                route,
                route == device.route,
                device.epoch,
            ))
        });
        let (url, sni, route, cookies, epoch) = match refusal(request, admitted) {
            Ok(found) => found,
            Err(answer) => return Step::Now(answer),
        };
        Step::Upstream(Box::new(upstream::Call {
            _guard: InFlight {
                inner: self.clone(),
                endpoint: from,
                route,
            },
            epoch,
            endpoint: from,
            request: request.clone(),
            kind: upstream::Kind::Oscore,
            cookies,
            url,
            sni,
            whole: MAX_DATAGRAM_MESSAGE,
        }))
    }

    /// Count one more upstream request of `device` to `route`, within the
    /// bounds: per device, per service (so that a hanging service cannot
    /// take every slot from the others), overall. Released by the
    /// request's [`InFlight`] guard, whatever ends it.
    fn admit(
        &self,
        device: &mut devices::Device,
        totals: devices::Totals,
        route: Option<usize>,
        from: Endpoint,
    ) -> Result<(), &'static str> {
        if device.in_flight >= self.config.max_requests_per_device.max(1) {
            return Err("too many requests of this device in progress");
        }
        if totals.in_flight >= self.config.max_upstream_requests.max(1) {
            return Err("too many upstream requests in progress");
        }
        let prefix = atls_sessions::ClientKey::from(from.addr.ip());
        let mut load = lock(&self.route_load);
        if load.route.get(&route).copied().unwrap_or(0) >= self.config.max_requests_per_service.max(1) {
            return Err("too many requests to this service in progress");
        }
        if load.prefix.get(&prefix).copied().unwrap_or(0) >= self.config.max_requests_per_ip.max(1) {
            return Err("too many requests from this address in progress");
        }
        *load.route.entry(route).or_insert(0) += 1;
        *load.prefix.entry(prefix).or_insert(0) += 1;
        device.in_flight = device.in_flight.saturating_add(1);
        Ok(())
    }

    fn block1(
        &self,
        request: &Packet,
        value: &[u8],
        from: Endpoint,
        now: Instant,
    ) -> Result<Block1Step, BlockError> {
        let block = BlockValue::decode(value)?;
        let size1 = request
            .get_first_option(CoapOption::Size1)
            .and_then(|v| read_uint(v))
            .map(|s| usize::try_from(s).unwrap_or(usize::MAX));
        let max = self.config.max_flight;
        lock(&self.devices)
            .with(from, now, &self.bounds, true, |device, totals| {
                // One host holds at most a few of the table's transfers.
                if block.num == 0
                    && device.block1.is_none()
                    && totals.prefix_transfers >= MAX_BLOCK1_PER_PREFIX
                {
                    return Err(BlockError::Busy);
                }
                block1_step(
                    &mut device.block1,
                    totals.transfers.min(MAX_BLOCK1_TRANSFERS),
                    block,
                    &request.payload,
                    size1,
                    max,
                    now,
                )
            })
            .ok()
            .flatten()
            .unwrap_or(Err(BlockError::Busy))
    }

    fn block2_follow_up(&self, request: &Packet, block2: BlockValue, from: Endpoint, now: Instant) -> Packet {
        let szx = block2.szx.min(BlockValue::szx_for(self.config.block_size));
        let format = self.config.content_format;
        let answer = lock(&self.devices).with(from, now, &self.bounds, false, |device, _| {
            let kept = device.block2.as_ref()?;
            if now.saturating_duration_since(kept.at) > self.config.transfer_timeout {
                device.block2 = None;
                return None;
            }
            let p = block2_packet(request, &kept.body, kept.tag, block2.num, szx, format);
            if block2_slice(&kept.body, block2.num, szx).is_some_and(|(_, v)| !v.more) {
                device.block2 = None;
            } else if let Some(kept) = device.block2.as_mut() {
                kept.at = now;
            }
            p
        });
        match answer {
            Ok(Some(Some(p))) => p,
            _ => block_error(request, BlockError::Incomplete),
        }
    }
}

/// Block `num` of `body` as a 2.04 answer with the ATLS Content-Format, the
/// body's ETag and, on the first, its size.
pub(crate) fn block2_packet(
    request: &Packet,
    body: &[u8],
    tag: [u8; 8],
    num: u32,
    szx: u8,
    format: u16,
) -> Option<Packet> {
    let (slice, value) = block2_slice(body, num, szx)?;
    let mut p = answer(request, ResponseType::Changed);
    p.add_option(CoapOption::ContentFormat, uint_option(u64::from(format)));
    p.add_option(CoapOption::Block2, value.encode());
    p.add_option(CoapOption::ETag, tag.to_vec());
    if num == 0 {
        p.add_option(CoapOption::Size2, uint_option(body.len() as u64));
    }
    p.payload = slice.to_vec();
    Some(p)
}

impl CoapHandler for Gateway {
    fn datagram(
        &self,
        message: &[u8],
        from: SocketAddr,
        transport: Transport,
        now: Instant,
    ) -> Answer<Vec<u8>> {
        let request = match parse_request(message) {
            None => return Answer::Now(None),
            Some(Err(pong)) => return Answer::Now(Some(pong)),
            Some(Ok(request)) => request,
        };
        let inner = &self.inner;
        let endpoint = Endpoint {
            addr: from,
            transport,
        };
        // Address validation of plain UDP (over DTLS the handshake did it):
        // nothing is kept for, and nothing is forwarded for, an address
        // that has not shown it receives what is sent to it.
        if transport == Transport::Udp && !lock(&inner.devices).contains(&endpoint) {
            if let Err(challenge) = inner.echo.check(&request, message.len(), from, now) {
                return Answer::Now(challenge);
            }
        }
        let mid = request.header.message_id;
        let seen = lock(&inner.devices).with(endpoint, now, &inner.bounds, true, |device, _| {
            devices::dedup(device, mid, now)
        });
        match seen {
            Err(why) => return Answer::Now(no_room(&request, why).to_bytes().ok()),
            Ok(Some(Err(cached))) => return Answer::Now(cached),
            Ok(None) => return Answer::Now(None),
            Ok(Some(Ok(()))) => {}
        }
        match inner.process(&request, endpoint, now, inner.config.block_size) {
            Step::Now(p) => {
                let bytes = p.to_bytes().ok();
                let _ =
                    lock(&inner.devices).with(
                        endpoint,
                        now,
                        &inner.bounds,
                        false,
                        |device, _| match &bytes {
                            Some(b) => devices::remember(device, mid, b),
                            None => devices::forget(device, mid),
                        },
                    );
                Answer::Now(bytes)
            }
            Step::Upstream(call) => {
                let inner = self.inner.clone();
                let epoch = call.epoch;
                Answer::Later(Box::pin(async move {
                    let p = inner.run(*call).await;
                    let bytes = p.to_bytes_unlimited().ok();
                    let _ = lock(&inner.devices).with(
                        endpoint,
                        Instant::now(),
                        &inner.bounds,
                        false,
                        |device, _| {
                            // An answer of an older DTLS session of the
                            // device is not remembered for the new one.
                            if device.epoch != epoch {
                                return;
                            }
                            match &bytes {
                                Some(b) => devices::remember(device, mid, b),
                                None => devices::forget(device, mid),
                            }
                        },
                    );
                    bytes
                }))
            }
        }
    }

    fn reliable(&self, request: &Packet, from: SocketAddr, now: Instant) -> Answer<Packet> {
        if !matches!(request.header.code, MessageClass::Request(_)) {
            return Answer::Now(None);
        }
        let endpoint = Endpoint {
            addr: from,
            transport: Transport::Tcp,
        };
        match self
            .inner
            .process(request, endpoint, now, atls_coap::tcp::MAX_MESSAGE_SIZE)
        {
            Step::Now(p) => Answer::Now(Some(p)),
            Step::Upstream(call) => {
                let inner = self.inner.clone();
                Answer::Later(Box::pin(async move { Some(inner.run(*call).await) }))
            }
        }
    }

    fn reset_exchanges(&self, addr: SocketAddr, transport: Transport) {
        // A new DTLS session scopes message IDs afresh (RFC 7252 §9.1); the
        // device's cookies and route stay (its ATLS session may outlive the
        // transport's).
        let endpoint = Endpoint { addr, transport };
        let _ = lock(&self.inner.devices).with(
            endpoint,
            Instant::now(),
            &self.inner.bounds,
            false,
            |device, _| {
                device.recent.clear();
                device.block1 = None;
                device.block2 = None;
                device.epoch = device.epoch.wrapping_add(1);
            },
        );
    }
}

/// Whether `request` continues a blockwise transfer under way (a Block2
/// follow-up, or a Block1 block after the first).
fn continues_transfer(request: &Packet) -> bool {
    [CoapOption::Block1, CoapOption::Block2]
        .into_iter()
        .any(|option| {
            request
                .get_first_option(option)
                .and_then(|v| atls_coap::block::BlockValue::decode(v).ok())
                .is_some_and(|b| b.num > 0)
        })
}
