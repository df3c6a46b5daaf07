//! The HTTP side: one upstream exchange per forwarded CoAP request, on the
//! device's own connection pool with the device's cookies, and the mapping
//! of its answer back to CoAP (RFC 8075 §7 for status codes; RFC 8613 §11
//! for OSCORE).

use std::time::{Duration, Instant};

use atls_coap::message::{answer, diagnostic, uint_option};
use atls_coap::server::Endpoint;
use coap_lite::{CoapOption, Packet, ResponseType};
use http::{header, HeaderMap, StatusCode};

use crate::devices::{Block2Body, MAX_COOKIES, MAX_COOKIE_BYTES};
use crate::{block2_packet, lock, Inner, MAX_BLOCK2_BYTES};

/// What is forwarded.
pub(crate) enum Kind {
    /// An ATLS flight (`hello`: it starts with a ClientHello).
    Flight { body: Vec<u8>, hello: bool },
    /// An OSCORE request (its option and payload are in the request).
    Oscore,
}

/// One upstream exchange to run.
pub(crate) struct Call {
    /// The device's epoch when the request arrived.
    pub(crate) epoch: u64,
    /// Whether the device's cookies ride along (its own service).
    pub(crate) cookies: bool,
    /// Gives back the request's slots when the exchange ends.
    pub(crate) _guard: crate::InFlight,
    pub(crate) endpoint: Endpoint,
    pub(crate) request: Packet,
    pub(crate) kind: Kind,
    pub(crate) url: reqwest::Url,
    pub(crate) sni: Option<String>,
    /// Largest answer sent without Block2.
    pub(crate) whole: usize,
}

/// `path` under the base URL `base` (keeping its path prefix).
pub(crate) fn join(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/');
    url.set_path(&format!("{prefix}{path}"));
    url.set_query(None);
    url
}

/// The CoAP response code of an HTTP status (RFC 8075 §7, read backwards):
/// the codes with a counterpart map to it, other client errors to 4.00,
/// other server errors to 5.02 (the gateway got an error it cannot name).
pub fn coap_code(status: StatusCode) -> ResponseType {
    match status.as_u16() {
        200 => ResponseType::Changed,
        201 => ResponseType::Created,
        401 => ResponseType::Unauthorized,
        403 => ResponseType::Forbidden,
        404 => ResponseType::NotFound,
        405 => ResponseType::MethodNotAllowed,
        406 => ResponseType::NotAcceptable,
        409 => ResponseType::Conflict,
        412 => ResponseType::PreconditionFailed,
        413 => ResponseType::RequestEntityTooLarge,
        415 => ResponseType::UnsupportedContentFormat,
        422 => ResponseType::UnprocessableEntity,
        429 => ResponseType::TooManyRequests,
        500 => ResponseType::InternalServerError,
        501 => ResponseType::NotImplemented,
        503 => ResponseType::ServiceUnavailable,
        504 => ResponseType::GatewayTimeout,
        400..=499 => ResponseType::BadRequest,
        _ => ResponseType::BadGateway,
    }
}

/// What the service answered.
struct Upstream {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Why there is no usable answer.
enum Failure {
    Timeout,
    Unreachable(String),
    TooLarge,
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let media = value.split(';').next().unwrap_or_default().trim();
    Some(media.to_ascii_lowercase())
}

/// The error and its causes, without the URL (which may carry the
/// service's password; logs name the URL redacted).
fn error_text(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    match e.url() {
        Some(url) => message.replace(url.as_str(), &atls_http::app::redact_url(url.as_str())),
        None => message,
    }
}

/// A short text/plain body of an error answer, as a CoAP diagnostic.
fn diagnostic_text(upstream: &Upstream) -> String {
    let plain = media_type(&upstream.headers).is_some_and(|m| m == "text/plain");
    let text = if plain {
        String::from_utf8_lossy(
            upstream
                .body
                .get(..upstream.body.len().min(120))
                .unwrap_or_default(),
        )
        .into_owned()
    } else {
        String::new()
    };
    if text.trim().is_empty() {
        format!("the service answered {}", upstream.status)
    } else {
        text.trim().to_owned()
    }
}

/// The records of `payload` as a middlebox sees them: `handshake:2 app:1`.
fn record_types(payload: &[u8]) -> String {
    let inspection = atls_core::inspect::inspect(payload);
    let mut counts: Vec<(String, usize)> = Vec::new();
    for r in &inspection.records {
        let name = match r.content_type {
            Some(t) => t.name().to_owned(),
            None => format!("type{}", r.content_type_code),
        };
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c = c.saturating_add(1),
            None => counts.push((name, 1)),
        }
    }
    if counts.is_empty() {
        return "-".into();
    }
    counts
        .iter()
        .map(|(n, c)| format!("{n}:{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The client of devices without a pool of their own: it keeps no
/// connection idle, so no connection ever carries two devices' requests.
pub(crate) fn unpooled_client(
    tls: &rustls::ClientConfig,
    config: &crate::GatewayConfig,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .connect_timeout(config.upstream_connect_timeout)
        .pool_max_idle_per_host(0)
        // HTTP/1.1: a connection carries one exchange at a time (an HTTP/2
        // connection would multiplex several devices' requests).
        .http1_only()
        .redirect(reqwest::redirect::Policy::none());
    builder = match &config.upstream_proxy {
        Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy).map_err(|e| e.to_string())?),
        None => builder.no_proxy(),
    };
    builder.build().map_err(|e| error_text(&e))
}

impl Inner {
    /// An upstream client: with a pool of its own (an established
    /// device's), or keeping no connection idle (half-open devices: one
    /// connection per exchange, never reused by another device).
    pub(crate) fn client(&self, pooled: bool) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(self.tls.clone())
            .connect_timeout(self.config.upstream_connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(usize::from(pooled))
            .redirect(reqwest::redirect::Policy::none());
        builder = match &self.config.upstream_proxy {
            Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy).map_err(|e| e.to_string())?),
            None => builder.no_proxy(),
        };
        builder.build().map_err(|e| error_text(&e))
    }

    /// Run one upstream exchange and map its answer to CoAP.
    pub(crate) async fn run(&self, call: Call) -> Packet {
        let started = Instant::now();
        let endpoint = call.endpoint;
        // The device's pool and cookies (it may have been forgotten
        // meanwhile: then a fresh pool and no cookies).
        // The device's pool and cookies (it may have been forgotten
        // meanwhile: then no pool and no cookies). Cookies go only to the
        // device's own service: a Proxy-Uri naming another gets none.
        let prepared = lock(&self.devices).with(endpoint, started, &self.bounds, false, |device, _| {
            let cookies: Vec<String> = if call.cookies {
                device
                    .cookies
                    .get_request_values(&call.url)
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect()
            } else {
                Vec::new()
            };
            let pool = device.http.clone().filter(|_| device.established);
            (device.established, pool, cookies.join("; "))
        });
        let (established, pool, cookie) = match prepared {
            Ok(Some(found)) => found,
            _ => (false, None, String::new()),
        };
        let client = match pool {
            Some(client) => client,
            // An established device gets a pool of its own (built outside
            // the lock); at most `max_pooled_devices` hold one.
            None if established => match self.client(true) {
                Ok(client) => {
                    let mut devices = lock(&self.devices);
                    // Another request of the device may have stored one
                    // meanwhile: use that one.
                    let stored = devices.with(endpoint, started, &self.bounds, false, |device, _| {
                        device.http.get_or_insert_with(|| client.clone()).clone()
                    });
                    devices.trim_pools(self.config.max_pooled_devices);
                    match stored {
                        Ok(Some(stored)) => stored,
                        _ => client,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot build an upstream client");
                    return diagnostic(
                        &call.request,
                        ResponseType::InternalServerError,
                        "upstream client",
                    );
                }
            },
            None => self.unpooled.clone(),
        };
        let (content_type, body, limit, kind_name) = match &call.kind {
            Kind::Flight { body, .. } => (
                atls_http::wire::CONTENT_TYPE_ATLS,
                body.clone(),
                self.config.max_flight,
                "flight",
            ),
            Kind::Oscore => (
                atls_oscore::http::CONTENT_TYPE_OSCORE,
                call.request.payload.clone(),
                self.config.max_message,
                "oscore",
            ),
        };
        let request_bytes = body.len();
        let mut builder = client
            .post(call.url.clone())
            .header(header::CONTENT_TYPE, content_type)
            .body(body.clone());
        if let Kind::Oscore = call.kind {
            let option = call
                .request
                .get_first_option(CoapOption::Oscore)
                .cloned()
                .unwrap_or_default();
            builder = builder.header(
                atls_oscore::http::OSCORE_HEADER,
                atls_oscore::http::header_value(&option),
            );
        }
        if !cookie.is_empty() {
            builder = builder.header(header::COOKIE, cookie);
        }
        let exchange = async {
            let mut response = builder.send().await.map_err(|e| {
                if e.is_timeout() {
                    Failure::Timeout
                } else {
                    Failure::Unreachable(error_text(&e))
                }
            })?;
            let status = response.status();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| {
                if e.is_timeout() {
                    Failure::Timeout
                } else {
                    Failure::Unreachable(error_text(&e))
                }
            })? {
                if body.len().saturating_add(chunk.len()) > limit {
                    return Err(Failure::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Upstream {
                status,
                headers,
                body,
            })
        };
        let outcome = match tokio::time::timeout(self.config.upstream_timeout, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Timeout),
        };
        let elapsed = started.elapsed();
        let upstream = match outcome {
            Ok(upstream) => upstream,
            Err(failure) => {
                self.done(endpoint, false, false);
                let (code, text) = match failure {
                    Failure::Timeout => (
                        ResponseType::GatewayTimeout,
                        "the service did not answer in time".to_owned(),
                    ),
                    Failure::Unreachable(e) => {
                        tracing::warn!(url = %atls_http::app::redact_url(call.url.as_str()), error = %e, "upstream unreachable");
                        (ResponseType::BadGateway, "the service is unreachable".to_owned())
                    }
                    Failure::TooLarge => (
                        ResponseType::BadGateway,
                        "the service's answer is too large".to_owned(),
                    ),
                };
                tracing::info!(
                    device = %endpoint.addr, transport = endpoint.transport.scheme(), kind = kind_name,
                    sni = call.sni.as_deref().unwrap_or("-"), upstream = %atls_http::app::redact_url(call.url.as_str()), request_bytes,
                    code = %coap_lite::MessageClass::Response(code), elapsed_ms = elapsed.as_millis() as u64,
                    "forward failed: {text}"
                );
                let packet = diagnostic(&call.request, code, &text);
                self.observe(&call, kind_name, &body, None, &packet);
                return packet;
            }
        };
        if call.cookies {
            self.keep_cookies(endpoint, &call.url, &upstream.headers);
        }
        let media = media_type(&upstream.headers);
        let forwarded = body;
        let packet = match &call.kind {
            Kind::Flight { body, hello } => {
                let packet = self.flight_answer(&call, &upstream, media.as_deref());
                let ok = upstream.status == StatusCode::OK
                    && packet.header.code == coap_lite::MessageClass::Response(ResponseType::Changed);
                self.done(endpoint, ok, false);
                tracing::info!(
                    device = %endpoint.addr, transport = endpoint.transport.scheme(), kind = kind_name,
                    sni = call.sni.as_deref().unwrap_or("-"), hello = *hello, upstream = %atls_http::app::redact_url(call.url.as_str()),
                    request_bytes, request_records = %record_types(body), status = upstream.status.as_u16(),
                    content_type = media.as_deref().unwrap_or("-"), response_bytes = upstream.body.len(),
                    response_records = %record_types(&upstream.body), code = %packet.header.code,
                    elapsed_ms = elapsed.as_millis() as u64, "forwarded"
                );
                packet
            }
            Kind::Oscore => {
                let packet = self.oscore_answer(&call, &upstream, media.as_deref());
                let ok = packet.get_option(CoapOption::Oscore).is_some();
                self.done(endpoint, false, ok);
                tracing::info!(
                    device = %endpoint.addr, transport = endpoint.transport.scheme(), kind = kind_name,
                    sni = call.sni.as_deref().unwrap_or("-"), upstream = %atls_http::app::redact_url(call.url.as_str()), request_bytes,
                    status = upstream.status.as_u16(), content_type = media.as_deref().unwrap_or("-"),
                    response_bytes = upstream.body.len(), code = %packet.header.code,
                    elapsed_ms = elapsed.as_millis() as u64, "forwarded"
                );
                packet
            }
        };
        self.observe(&call, kind_name, &forwarded, Some(&upstream), &packet);
        packet
    }

    fn observe(
        &self,
        call: &Call,
        kind: &'static str,
        request: &[u8],
        upstream: Option<&Upstream>,
        packet: &Packet,
    ) {
        metrics::counter!("atls_gateway_forwarded_total", "kind" => kind, "code" => packet.header.code.to_string()).increment(1);
        let Some(observer) = &self.observer else { return };
        observer(&crate::Observation {
            device: call.endpoint.addr,
            transport: call.endpoint.transport,
            kind,
            sni: call.sni.clone(),
            upstream: atls_http::app::redact_url(call.url.as_str()),
            request: request.to_vec(),
            status: upstream.map(|u| u.status.as_u16()),
            response_type: upstream.and_then(|u| media_type(&u.headers)),
            response: upstream.map(|u| u.body.clone()).unwrap_or_default(),
            code: packet.header.code.to_string(),
        });
    }

    /// The device's upstream request was answered: `flight_ok` counts an answered
    /// flight exchange (two make a completed handshake), `oscore_ok` an
    /// answered OSCORE exchange (the device is established).
    fn done(&self, endpoint: Endpoint, flight_ok: bool, oscore_ok: bool) {
        let _ = lock(&self.devices).with(endpoint, Instant::now(), &self.bounds, false, |device, _| {
            if flight_ok {
                device.exchanges = device.exchanges.saturating_add(1);
                if device.exchanges >= 2 {
                    device.established = true;
                }
            }
            if oscore_ok {
                device.established = true;
            }
        });
    }

    /// Keep the service's cookies for the device, within the bounds: at
    /// most `MAX_COOKIES` cookies (whatever their names and paths) of at
    /// most `MAX_COOKIE_BYTES` together; a cookie that would exceed them is
    /// ignored.
    fn keep_cookies(&self, endpoint: Endpoint, url: &reqwest::Url, headers: &HeaderMap) {
        let _ = lock(&self.devices).with(endpoint, Instant::now(), &self.bounds, false, |device, _| {
            for value in headers.get_all(header::SET_COOKIE) {
                let Ok(text) = value.to_str() else { continue };
                // RFC 6265 §6.1: at least 4096 bytes per cookie; no more here.
                if text.len() > 4096 {
                    continue;
                }
                let mut trial = device.cookies.clone();
                // A cookie the store refuses (wrong domain, bad syntax) is
                // ignored, as browsers do.
                let _ = trial.parse(text, url);
                // Expired cookies go; the rest are counted whole, their
                // attributes included (the store keeps them).
                let Ok(live) = cookie_store::CookieStore::from_cookies(
                    trial
                        .iter_unexpired()
                        .cloned()
                        .map(Ok::<_, std::convert::Infallible>),
                    false,
                );
                trial = live;
                let count = trial.iter_any().count();
                let bytes: usize = trial.iter_any().map(|c| c.to_string().len()).sum();
                if count <= MAX_COOKIES && bytes <= MAX_COOKIE_BYTES {
                    device.cookies = trial;
                }
            }
        });
    }

    /// The CoAP answer to a forwarded flight.
    fn flight_answer(&self, call: &Call, upstream: &Upstream, media: Option<&str>) -> Packet {
        let atls = media == Some(atls_http::wire::CONTENT_TYPE_ATLS);
        // What comes back must be TLS records too (or nothing).
        let records_ok = upstream.body.is_empty()
            || atls_core::records::detect_framing(&upstream.body)
                .is_some_and(|f| atls_core::records::split_records(f, &upstream.body).is_ok());
        let request = &call.request;
        let format = self.config.content_format;
        if upstream.status == StatusCode::OK {
            if !atls || !records_ok {
                tracing::warn!(url = %atls_http::app::redact_url(call.url.as_str()), content_type = media.unwrap_or("-"), "the service answered a flight with something that is not ATLS");
                return diagnostic(
                    request,
                    ResponseType::BadGateway,
                    "the service's answer is not ATLS",
                );
            }
            if upstream.body.len() <= call.whole {
                let mut p = answer(request, ResponseType::Changed);
                p.add_option(CoapOption::ContentFormat, uint_option(u64::from(format)));
                p.payload = upstream.body.clone();
                return p;
            }
            return self.first_block(call, &upstream.body);
        }
        let code = coap_code(upstream.status);
        let mut p = if atls && records_ok && !upstream.body.is_empty() && upstream.body.len() <= call.whole {
            // A TLS alert: the device's stack reads it.
            let mut p = answer(request, code);
            p.add_option(CoapOption::ContentFormat, uint_option(u64::from(format)));
            p.payload = upstream.body.clone();
            p
        } else {
            diagnostic(request, code, &diagnostic_text(upstream))
        };
        if let Some(max_age) = retry_after(&upstream.headers) {
            p.add_option(CoapOption::MaxAge, uint_option(max_age));
        }
        p
    }

    fn first_block(&self, call: &Call, body: &[u8]) -> Packet {
        let request = &call.request;
        let tag = atls_coap::block::etag(body);
        let szx = atls_coap::block::BlockValue::szx_for(self.config.block_size);
        let Some(first) = block2_packet(request, body, tag, 0, szx, self.config.content_format) else {
            return diagnostic(
                request,
                ResponseType::InternalServerError,
                "cannot split the answer",
            );
        };
        let kept = lock(&self.devices).with(
            call.endpoint,
            Instant::now(),
            &self.bounds,
            false,
            |device, totals| {
                if device.epoch != call.epoch {
                    // The device started a new DTLS session meanwhile.
                    return false;
                }
                let held = device.block2.as_ref().map_or(0, |b| b.body.len());
                if totals
                    .block2_bytes
                    .saturating_sub(held)
                    .saturating_add(body.len())
                    > MAX_BLOCK2_BYTES
                {
                    return false;
                }
                device.block2 = Some(Block2Body {
                    body: body.to_vec(),
                    tag,
                    at: Instant::now(),
                });
                true
            },
        );
        match kept {
            Ok(Some(true)) => first,
            _ => {
                let mut p = diagnostic(
                    request,
                    ResponseType::ServiceUnavailable,
                    "too many answers in progress",
                );
                p.add_option(CoapOption::MaxAge, uint_option(1));
                p
            }
        }
    }

    /// The CoAP answer to a forwarded OSCORE request (RFC 8613 §11.3).
    fn oscore_answer(&self, call: &Call, upstream: &Upstream, media: Option<&str>) -> Packet {
        let request = &call.request;
        if upstream.status == StatusCode::OK {
            if media != Some(atls_oscore::http::CONTENT_TYPE_OSCORE) {
                return diagnostic(
                    request,
                    ResponseType::BadGateway,
                    "the service's answer is not OSCORE",
                );
            }
            let response = {
                let mut builder = http::Response::builder().status(upstream.status);
                for (name, value) in &upstream.headers {
                    builder = builder.header(name, value);
                }
                builder.body(upstream.body.clone())
            };
            let outer = match response
                .map_err(|e| e.to_string())
                .and_then(|r| atls_oscore::http::response_from_http(&r).map_err(|e| e.to_string()))
            {
                Ok(outer) => outer,
                Err(_) => {
                    return diagnostic(
                        request,
                        ResponseType::BadGateway,
                        "the service's answer is not OSCORE",
                    )
                }
            };
            let mut p = answer(request, ResponseType::Changed);
            for (number, values) in outer.options() {
                for value in values {
                    p.add_option(CoapOption::from(*number), value.clone());
                }
            }
            p.payload = outer.payload;
            if call.whole < usize::MAX
                && p.payload.len() > call.whole
                && call.endpoint.transport != atls_coap::Transport::Tcp
            {
                return diagnostic(
                    request,
                    ResponseType::BadGateway,
                    "the protected answer does not fit one message; ask for it in inner blocks",
                );
            }
            return p;
        }
        // An unprotected error (RFC 8613 §8.2: 4.01 for no context, 4.00,
        // 4.02), or the service's own error.
        let mut p = diagnostic(request, coap_code(upstream.status), &diagnostic_text(upstream));
        if matches!(upstream.status.as_u16(), 400 | 401) {
            p.add_option(CoapOption::MaxAge, Vec::new());
        } else if let Some(max_age) = retry_after(&upstream.headers) {
            p.add_option(CoapOption::MaxAge, uint_option(max_age));
        }
        p
    }
}

/// A Retry-After in seconds, as Max-Age (RFC 8075 §7).
fn retry_after(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| s.min(u64::from(u32::MAX)))
}
