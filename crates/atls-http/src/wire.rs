//! What crosses the wire: paths, media types, the session cookie and the
//! HTTP/1.1 messages carried inside TLS records in record mode.
//!
//! Everything here is fixed by docs/PROTOCOL.md §12 so that independent peers
//! interoperate.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};

use crate::error::WireError;

/// The handshake and record-mode endpoint (draft §5.1).
pub const WELL_KNOWN_PATH: &str = "/.well-known/atls";
/// Media type of a body carrying TLS records (draft §5.1).
pub const CONTENT_TYPE_ATLS: &str = "application/atls";
/// Media type of a COSE-mode body (RFC 9052 §2, draft §9.2).
pub const CONTENT_TYPE_COSE: &str = "application/cose; cose-type=\"cose-encrypt0\"";
/// Media type of an OSCORE-mode body (RFC 8613 §11).
pub const CONTENT_TYPE_OSCORE: &str = atls_oscore::http::CONTENT_TYPE_OSCORE;
/// Default name of the session cookie (configurable on the server:
/// [`crate::ServerOptions::cookie_name`]).
pub const COOKIE_NAME: &str = "atls-session";

pub use atls_sessions::{SessionId, SESSION_ID_LEN};

/// How application messages are protected once the handshake is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// HTTP/1.1 messages inside TLS application-data records (draft Figure 5).
    Records,
    /// OSCORE keyed from the `atls-oscore` export (draft Figure 6, §9.1).
    #[default]
    Oscore,
    /// COSE_Encrypt0 bodies keyed from the `atls-cose` export (§9.2).
    Cose,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::Records, Mode::Oscore, Mode::Cose];

    /// The mode's name as the command line and `/session` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Records => "records",
            Mode::Oscore => "oscore",
            Mode::Cose => "cose",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "records" | "record" => Ok(Mode::Records),
            "oscore" => Ok(Mode::Oscore),
            "cose" => Ok(Mode::Cose),
            other => Err(format!("unknown mode {other:?} (records, oscore, cose)")),
        }
    }
}

/// Whether `name` is a cookie name RFC 6265 §4.1.1 allows (an HTTP token).
pub fn is_valid_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The `Set-Cookie` value for a new session (RFC 6265 §4.1).
pub fn set_cookie(name: &str, id: SessionId, max_age_secs: u64, secure: bool) -> String {
    let mut value = format!(
        "{name}={}; Path=/; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict",
        id.to_hex()
    );
    if secure {
        value.push_str("; Secure");
    }
    value
}

/// What a request says about its session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieLookup {
    /// No cookie of that name.
    Absent,
    /// A cookie of that name whose value is not a session identifier.
    Malformed,
    /// A session identifier.
    Session(SessionId),
}

/// Most cookies of the session cookie's name looked at in one request.
const MAX_SESSION_COOKIES: usize = 8;

/// Every cookie named `name` in a request, in order (at most 8): a client
/// may hold several (a stale one with another Path, one a middlebox added),
/// and the server uses the first that names a live session.
pub fn session_cookies(headers: &http::HeaderMap, name: &str) -> Vec<CookieLookup> {
    let mut found = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((n, v)) = pair.trim().split_once('=') {
                if n.trim() == name && found.len() < MAX_SESSION_COOKIES {
                    found.push(match SessionId::parse(v.trim().trim_matches('"')) {
                        Some(id) => CookieLookup::Session(id),
                        None => CookieLookup::Malformed,
                    });
                }
            }
        }
    }
    found
}

/// The first session cookie named `name` of a request.
pub fn session_cookie(headers: &http::HeaderMap, name: &str) -> CookieLookup {
    session_cookies(headers, name)
        .into_iter()
        .next()
        .unwrap_or(CookieLookup::Absent)
}

/// Whether a `Content-Type` value names `media` (parameters ignored, case-insensitive).
pub fn is_media_type(headers: &http::HeaderMap, media: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim())
        .is_some_and(|v| v.eq_ignore_ascii_case(media))
}

/// Limits on an HTTP/1.1 message carried inside TLS.
const MAX_HEADERS: usize = 64;
const MAX_HEAD: usize = crate::limits::HEAD_ALLOWANCE;

fn head_end(bytes: &[u8]) -> Result<usize, WireError> {
    bytes
        .windows(4)
        .take(MAX_HEAD)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .ok_or(WireError::Http1("no complete message head"))
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, WireError> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(WireError::Http1(
                "Transfer-Encoding is not used inside ATLS records",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v: usize = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or(WireError::Http1("invalid Content-Length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(WireError::Http1("conflicting Content-Length"));
            }
            length = Some(v);
        }
    }
    Ok(length.unwrap_or(0))
}

fn body_of(bytes: &[u8], start: usize, len: usize, limit: usize) -> Result<Bytes, WireError> {
    if len > limit {
        return Err(WireError::TooLarge);
    }
    let end = start
        .checked_add(len)
        .ok_or(WireError::Http1("invalid Content-Length"))?;
    if end != bytes.len() {
        return Err(WireError::Http1("body length differs from Content-Length"));
    }
    Ok(Bytes::copy_from_slice(&bytes[start..end]))
}

/// Parse one HTTP/1.1 request (head and `Content-Length` body, nothing after it).
pub fn parse_request(bytes: &[u8], body_limit: usize) -> Result<Request<Bytes>, WireError> {
    let end = head_end(bytes)?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&bytes[..end]) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        _ => return Err(WireError::Http1("malformed request head")),
    }
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| WireError::Http1("invalid method"))?;
    let uri: Uri = parsed
        .path
        .unwrap_or_default()
        .parse()
        .map_err(|_| WireError::Http1("invalid request target"))?;
    let length = content_length(parsed.headers)?;
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .version(Version::HTTP_11);
    for h in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| WireError::Http1("invalid header"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| WireError::Http1("invalid header"))?;
        request = request.header(name, value);
    }
    request
        .body(body_of(bytes, end, length, body_limit)?)
        .map_err(|_| WireError::Http1("invalid request"))
}

/// Parse one HTTP/1.1 response.
pub fn parse_response(bytes: &[u8], body_limit: usize) -> Result<Response<Bytes>, WireError> {
    let end = head_end(bytes)?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    match parsed.parse(&bytes[..end]) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        _ => return Err(WireError::Http1("malformed response head")),
    }
    let status = StatusCode::from_u16(parsed.code.unwrap_or_default())
        .map_err(|_| WireError::Http1("invalid status"))?;
    let length = content_length(parsed.headers)?;
    let mut response = Response::builder().status(status).version(Version::HTTP_11);
    for h in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| WireError::Http1("invalid header"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| WireError::Http1("invalid header"))?;
        response = response.header(name, value);
    }
    response
        .body(body_of(bytes, end, length, body_limit)?)
        .map_err(|_| WireError::Http1("invalid response"))
}

fn write_headers(out: &mut Vec<u8>, headers: &http::HeaderMap, body_len: usize) {
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {body_len}\r\n\r\n").as_bytes());
}

/// Serialise a request as HTTP/1.1 (origin form, `Host` from the URI when missing).
pub fn encode_request(request: &Request<Bytes>) -> Vec<u8> {
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(128 + request.body().len());
    out.extend_from_slice(format!("{} {target} HTTP/1.1\r\n", request.method()).as_bytes());
    if !request.headers().contains_key(header::HOST) {
        if let Some(authority) = request.uri().authority() {
            out.extend_from_slice(format!("host: {authority}\r\n").as_bytes());
        }
    }
    write_headers(&mut out, request.headers(), request.body().len());
    out.extend_from_slice(request.body());
    out
}

/// Serialise a response as HTTP/1.1.
pub fn encode_response(response: &Response<Bytes>) -> Vec<u8> {
    let status = response.status();
    let mut out = Vec::with_capacity(128 + response.body().len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    write_headers(&mut out, response.headers(), response.body().len());
    out.extend_from_slice(response.body());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_http1() {
        let request = Request::builder()
            .method("POST")
            .uri("http://atls.test/echo?x=1")
            .header("x-a", "b")
            .body(Bytes::from_static(b"payload"))
            .expect("request");
        let bytes = encode_request(&request);
        let parsed = parse_request(&bytes, 1024).expect("parses");
        assert_eq!(parsed.method(), Method::POST);
        assert_eq!(parsed.uri(), "/echo?x=1");
        assert_eq!(parsed.headers()["host"], "atls.test");
        assert_eq!(parsed.headers()["x-a"], "b");
        assert_eq!(parsed.body().as_ref(), b"payload");
    }

    #[test]
    fn responses_round_trip_through_http1() {
        let response = Response::builder()
            .status(404)
            .header("content-type", "text/plain")
            .body(Bytes::from_static(b"gone"))
            .expect("response");
        let parsed = parse_response(&encode_response(&response), 1024).expect("parses");
        assert_eq!(parsed.status(), StatusCode::NOT_FOUND);
        assert_eq!(parsed.body().as_ref(), b"gone");
    }

    #[test]
    fn hostile_http1_is_refused() {
        let limit = 16;
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"GET / HTTP/1.1\r\ncontent-length: 5\r\n\r\nab",
            b"GET / HTTP/1.1\r\ncontent-length: 1\r\n\r\nab",
            b"GET / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\ncontent-length: 17\r\n\r\n01234567890123456",
            b"\r\n\r\n",
            b"G\0T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                parse_request(bad, limit).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn cookies_are_strict_and_parse_back() {
        let a = SessionId::random().expect("random");
        let set = set_cookie("sid", a, 600, true);
        for attribute in [
            "sid=",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Secure",
            "Max-Age=600",
        ] {
            assert!(set.contains(attribute), "{set}");
        }
        assert!(!set_cookie(COOKIE_NAME, a, 600, false).contains("Secure"));
        let mut request = http::HeaderMap::new();
        request.insert(
            header::COOKIE,
            format!("other=1; sid={}", a.to_hex()).parse().expect("value"),
        );
        assert_eq!(session_cookie(&request, "sid"), CookieLookup::Session(a));
        assert_eq!(session_cookie(&request, COOKIE_NAME), CookieLookup::Absent);
        request.insert(header::COOKIE, "sid=zz".parse().expect("value"));
        assert_eq!(session_cookie(&request, "sid"), CookieLookup::Malformed);
        assert!(is_valid_cookie_name("atls_sid") && is_valid_cookie_name(COOKIE_NAME));
        assert!(!is_valid_cookie_name("a b") && !is_valid_cookie_name("a=b") && !is_valid_cookie_name(""));
    }
}
