//! OSCORE over HTTP (RFC 8613 §11) and the RFC 8075 "simple form" mapping
//! between an inner HTTP message and the inner CoAP message, so that an HTTP
//! endpoint can originate and terminate OSCORE (§11.4).
//!
//! Outer messages: a protected request is `POST` to the outer target (`/` by
//! default: the inner path travels encrypted), `Content-Type:
//! application/oscore`, the `OSCORE` header field carrying the option value in
//! base64url without padding (`AA` for an empty option), the ciphertext as
//! body. Protected responses are `200 OK` likewise.
//!
//! Inner messages: method ↔ code, path segments ↔ Uri-Path, query parameters
//! ↔ Uri-Query, `Content-Type` ↔ Content-Format and `Accept` ↔ Accept for the
//! registered formats below, body ↔ payload, status ↔ response code. Other
//! HTTP header fields have no CoAP counterpart in the simple form and are not
//! carried.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::error::OscoreError;

/// Media type of an OSCORE-protected HTTP body (RFC 8613 §13.5).
pub const CONTENT_TYPE_OSCORE: &str = "application/oscore";
/// The inner request's header fields the simple form does not carry: all
/// but `Content-Type` and `Accept` (and `Host` and `Content-Length`, which
/// the request line and payload stand for). A client can warn that they
/// will not reach the server.
pub fn uncarried_headers(headers: &http::HeaderMap) -> Vec<http::HeaderName> {
    let mut names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|n| {
            ![
                header::CONTENT_TYPE,
                header::ACCEPT,
                header::HOST,
                header::CONTENT_LENGTH,
            ]
            .contains(n)
        })
        .cloned()
        .collect();
    names.dedup();
    names
}

/// The HTTP header field carrying the OSCORE option.
pub const OSCORE_HEADER: &str = "oscore";
/// Largest OSCORE header value accepted (the option is at most a few hundred bytes).
const MAX_HEADER: usize = 1024;

/// §11.2: the header value for an OSCORE option value.
pub fn header_value(option: &[u8]) -> String {
    if option.is_empty() {
        "AA".to_owned()
    } else {
        URL_SAFE_NO_PAD.encode(option)
    }
}

/// §11.3: the OSCORE option value from a header value.
pub fn option_from_header(value: &[u8]) -> Result<Vec<u8>, OscoreError> {
    if value.len() > MAX_HEADER || value.len() < 2 {
        return Err(OscoreError::Decode("OSCORE header field of invalid length"));
    }
    if value == b"AA" {
        return Ok(Vec::new());
    }
    URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| OscoreError::Decode("OSCORE header field is not base64url"))
}

fn outer_option(packet: &Packet) -> Result<Vec<u8>, OscoreError> {
    packet
        .get_option(CoapOption::Oscore)
        .and_then(|v| v.front().cloned())
        .ok_or(OscoreError::NotProtected)
}

/// An outer (protected) CoAP request as the HTTP request of §11.1/§11.2.
pub fn request_to_http(outer: &Packet, target: &str) -> Result<Request<Vec<u8>>, OscoreError> {
    let option = outer_option(outer)?;
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(target)
        .header(header::CONTENT_TYPE, CONTENT_TYPE_OSCORE)
        .header(OSCORE_HEADER, header_value(&option));
    if let Some(host) = outer.get_option(CoapOption::UriHost).and_then(|v| v.front()) {
        builder = builder.header(header::HOST, HeaderValue::from_bytes(host).map_err(coap_err)?);
    }
    builder.body(outer.payload.clone()).map_err(coap_err)
}

fn coap_err(e: impl std::fmt::Display) -> OscoreError {
    OscoreError::Coap(e.to_string())
}

/// The OSCORE option of an outer message. The body is not bounded here: the
/// caller bounds what it reads, and the security context enforces its
/// [`max_message`](crate::SecurityContext::max_message) when it unprotects.
fn outer_oscore_option(headers: &http::HeaderMap) -> Result<Vec<u8>, OscoreError> {
    let content_type = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes);
    if content_type != Some(CONTENT_TYPE_OSCORE.as_bytes()) {
        return Err(OscoreError::NotProtected);
    }
    let value = headers.get(OSCORE_HEADER).ok_or(OscoreError::NotProtected)?;
    option_from_header(value.as_bytes())
}

/// §11.3: the outer CoAP request of an OSCORE-protected HTTP request.
pub fn request_from_http(request: &Request<Vec<u8>>) -> Result<Packet, OscoreError> {
    if request.method() != Method::POST
        && request.method() != Method::from_bytes(b"FETCH").map_err(coap_err)?
    {
        return Err(OscoreError::Decode("an OSCORE request is POST (or FETCH)"));
    }
    let option = outer_oscore_option(request.headers())?;
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Request(RequestType::Post);
    packet.add_option(CoapOption::Oscore, option);
    packet.payload = request.body().clone();
    Ok(packet)
}

/// An outer (protected) CoAP response as the HTTP response of §11.2: 200 OK.
pub fn response_to_http(outer: &Packet) -> Result<Response<Vec<u8>>, OscoreError> {
    let option = outer_option(outer)?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, CONTENT_TYPE_OSCORE)
        .header(OSCORE_HEADER, header_value(&option))
        .body(outer.payload.clone())
        .map_err(coap_err)
}

/// §11.3: the outer CoAP response of an OSCORE-protected HTTP response.
pub fn response_from_http(response: &Response<Vec<u8>>) -> Result<Packet, OscoreError> {
    let option = outer_oscore_option(response.headers())?;
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Response(ResponseType::Changed);
    packet.add_option(CoapOption::Oscore, option);
    packet.payload = response.body().clone();
    Ok(packet)
}

/// Content-Formats of the simple form (RFC 7252 §12.3, RFC 8428, RFC 8949).
const FORMATS: &[(u16, &str)] = &[
    (0, "text/plain;charset=utf-8"),
    (40, "application/link-format"),
    (41, "application/xml"),
    (42, "application/octet-stream"),
    (50, "application/json"),
    (60, "application/cbor"),
];

fn format_of(media: &str) -> Option<u16> {
    let normalized: String = media
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let bare = normalized.split(';').next().unwrap_or_default();
    FORMATS
        .iter()
        .find(|(_, m)| {
            *m == normalized || (bare == "text/plain" && *m == "text/plain;charset=utf-8") || *m == bare
        })
        .map(|(f, _)| *f)
}

fn media_of(format: &[u8]) -> Option<&'static str> {
    let n = format.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b));
    FORMATS.iter().find(|(f, _)| u32::from(*f) == n).map(|(_, m)| *m)
}

fn uint_option(value: u16) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn percent_encode(bytes: &[u8], extra_safe: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || (b"-._~!$&'()*+,;=:@".contains(&b) && !extra_safe.contains(&b)) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RFC 8075 simple form: the inner CoAP request of an HTTP request.
pub fn coap_request_from_http(request: &Request<Vec<u8>>) -> Result<Packet, OscoreError> {
    let code = match request.method().as_str() {
        "GET" => RequestType::Get,
        "POST" => RequestType::Post,
        "PUT" => RequestType::Put,
        "DELETE" => RequestType::Delete,
        "FETCH" => RequestType::Fetch,
        "PATCH" => RequestType::Patch,
        "IPATCH" => RequestType::IPatch,
        _ => {
            return Err(OscoreError::Coap(format!(
                "method {} has no CoAP code",
                request.method()
            )))
        }
    };
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Request(code);
    for segment in request.uri().path().split('/').skip(1) {
        if !segment.is_empty() {
            packet.add_option(CoapOption::UriPath, percent_decode(segment));
        }
    }
    if let Some(query) = request.uri().query() {
        for param in query.split('&').filter(|p| !p.is_empty()) {
            packet.add_option(CoapOption::UriQuery, percent_decode(param));
        }
    }
    if let Some(ct) = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let format = format_of(ct)
            .ok_or_else(|| OscoreError::Coap(format!("Content-Type {ct} has no CoAP Content-Format")))?;
        packet.add_option(CoapOption::ContentFormat, uint_option(format));
    }
    if let Some(accept) = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(format_of)
    {
        packet.add_option(CoapOption::Accept, uint_option(accept));
    }
    packet.payload = request.body().clone();
    Ok(packet)
}

/// RFC 8075 simple form: the HTTP request of an inner CoAP request.
pub fn http_request_from_coap(packet: &Packet) -> Result<Request<Vec<u8>>, OscoreError> {
    let method = match packet.header.code {
        MessageClass::Request(RequestType::Get) => Method::GET,
        MessageClass::Request(RequestType::Post) => Method::POST,
        MessageClass::Request(RequestType::Put) => Method::PUT,
        MessageClass::Request(RequestType::Delete) => Method::DELETE,
        MessageClass::Request(RequestType::Patch) => Method::PATCH,
        MessageClass::Request(RequestType::Fetch) => Method::from_bytes(b"FETCH").map_err(coap_err)?,
        MessageClass::Request(RequestType::IPatch) => Method::from_bytes(b"IPATCH").map_err(coap_err)?,
        other => return Err(OscoreError::Coap(format!("{other:?} is not a request"))),
    };
    let mut target = String::new();
    for segment in packet.get_option(CoapOption::UriPath).into_iter().flatten() {
        target.push('/');
        target.push_str(&percent_encode(segment, b""));
    }
    if target.is_empty() {
        target.push('/');
    }
    let queries: Vec<String> = packet
        .get_option(CoapOption::UriQuery)
        .into_iter()
        .flatten()
        .map(|q| percent_encode(q, b"&"))
        .collect();
    if !queries.is_empty() {
        target.push('?');
        target.push_str(&queries.join("&"));
    }
    let mut builder = Request::builder().method(method).uri(target);
    if let Some(media) = packet
        .get_option(CoapOption::ContentFormat)
        .and_then(|v| v.front())
        .and_then(|f| media_of(f))
    {
        builder = builder.header(header::CONTENT_TYPE, media);
    }
    if let Some(media) = packet
        .get_option(CoapOption::Accept)
        .and_then(|v| v.front())
        .and_then(|f| media_of(f))
    {
        builder = builder.header(header::ACCEPT, media);
    }
    builder.body(packet.payload.clone()).map_err(coap_err)
}

/// RFC 8075 §7: the HTTP status of a CoAP response code.
fn status_of(code: MessageClass) -> StatusCode {
    let raw = u8::from(code);
    let (class, detail) = (raw >> 5, raw & 0x1F);
    let status = match (class, detail) {
        (2, 1) => 201,
        (2, 2) | (2, 4) => 200,
        (2, 3) => 304,
        (2, 5) => 200,
        (4, 0) => 400,
        (4, 1) => 401,
        (4, 2) => 400,
        (4, 3) => 403,
        (4, 4) => 404,
        (4, 5) => 405,
        (4, 6) => 406,
        (4, 12) => 412,
        (4, 13) => 413,
        (4, 15) => 415,
        (5, 1) => 501,
        (5, 2) => 502,
        (5, 3) => 503,
        (5, 4) => 504,
        (4, _) => 400,
        _ => 500,
    };
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn code_of(status: StatusCode, method_is_get: bool) -> ResponseType {
    match status.as_u16() {
        201 => ResponseType::Created,
        200 | 203 if method_is_get => ResponseType::Content,
        200..=299 => ResponseType::Changed,
        304 => ResponseType::Valid,
        401 => ResponseType::Unauthorized,
        403 => ResponseType::Forbidden,
        404 => ResponseType::NotFound,
        405 => ResponseType::MethodNotAllowed,
        406 => ResponseType::NotAcceptable,
        412 => ResponseType::PreconditionFailed,
        413 => ResponseType::RequestEntityTooLarge,
        415 => ResponseType::UnsupportedContentFormat,
        400..=499 => ResponseType::BadRequest,
        501 => ResponseType::NotImplemented,
        502 => ResponseType::BadGateway,
        503 => ResponseType::ServiceUnavailable,
        504 => ResponseType::GatewayTimeout,
        _ => ResponseType::InternalServerError,
    }
}

/// RFC 8075 simple form: the HTTP response of an inner CoAP response.
pub fn http_response_from_coap(packet: &Packet) -> Result<Response<Vec<u8>>, OscoreError> {
    let mut builder = Response::builder().status(status_of(packet.header.code));
    if let Some(media) = packet
        .get_option(CoapOption::ContentFormat)
        .and_then(|v| v.front())
        .and_then(|f| media_of(f))
    {
        builder = builder.header(header::CONTENT_TYPE, media);
    }
    builder.body(packet.payload.clone()).map_err(coap_err)
}

/// RFC 8075 simple form: the inner CoAP response of an HTTP response to a
/// request made with `method`.
pub fn coap_response_from_http(response: &Response<Vec<u8>>, method: &Method) -> Result<Packet, OscoreError> {
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Response(code_of(response.status(), method == Method::GET));
    if let Some(ct) = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(format) = format_of(ct) {
            packet.add_option(CoapOption::ContentFormat, uint_option(format));
        }
    }
    packet.payload = response.body().clone();
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_field_encoding() {
        assert_eq!(header_value(&[]), "AA");
        assert_eq!(header_value(&[0x09, 0x14]), "CRQ");
        assert_eq!(option_from_header(b"AA").expect("valid"), Vec::<u8>::new());
        assert_eq!(option_from_header(b"CRQ").expect("valid"), vec![0x09, 0x14]);
        assert!(option_from_header(b"C").is_err());
        assert!(option_from_header(b"C=Q").is_err());
        assert!(option_from_header(b"+/").is_err(), "base64url, not base64");
        assert!(option_from_header(&[b'A'; 2000]).is_err());
    }

    #[test]
    fn simple_form_round_trip() {
        let req = Request::builder()
            .method("POST")
            .uri("/sensors/t%20emp?unit=c&raw")
            .header("content-type", "application/json")
            .header("accept", "application/cbor")
            .body(b"{}".to_vec())
            .expect("request");
        let coap = coap_request_from_http(&req).expect("map");
        let paths: Vec<_> = coap
            .get_option(CoapOption::UriPath)
            .expect("path")
            .iter()
            .cloned()
            .collect();
        assert_eq!(paths, vec![b"sensors".to_vec(), b"t emp".to_vec()]);
        let back = http_request_from_coap(&coap).expect("map back");
        assert_eq!(back.method(), Method::POST);
        assert_eq!(back.uri().path(), "/sensors/t%20emp");
        assert_eq!(back.uri().query(), Some("unit=c&raw"));
        assert_eq!(back.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(back.headers()[header::ACCEPT], "application/cbor");
        assert_eq!(back.body(), b"{}");

        let unknown = Request::builder()
            .method("CONNECT")
            .uri("/")
            .body(Vec::new())
            .expect("request");
        assert!(coap_request_from_http(&unknown).is_err());
        let odd_type = Request::builder()
            .method("POST")
            .uri("/")
            .header("content-type", "image/png")
            .body(Vec::new())
            .expect("request");
        assert!(coap_request_from_http(&odd_type).is_err());
    }

    #[test]
    fn outer_messages_need_the_oscore_media_type_and_header() {
        let plain = Request::builder()
            .method("POST")
            .uri("/")
            .body(b"x".to_vec())
            .expect("req");
        assert_eq!(
            request_from_http(&plain).map(|_| ()),
            Err(OscoreError::NotProtected)
        );
        let no_header = Request::builder()
            .method("POST")
            .uri("/")
            .header("content-type", CONTENT_TYPE_OSCORE)
            .body(b"x".to_vec())
            .expect("req");
        assert_eq!(
            request_from_http(&no_header).map(|_| ()),
            Err(OscoreError::NotProtected)
        );
        let get = Request::builder()
            .method("GET")
            .uri("/")
            .header("content-type", CONTENT_TYPE_OSCORE)
            .header(OSCORE_HEADER, "CRQ")
            .body(Vec::new())
            .expect("req");
        assert!(matches!(request_from_http(&get), Err(OscoreError::Decode(_))));
    }
}
