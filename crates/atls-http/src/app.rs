//! Inner applications for `atls serve`: the built-in resources, and a
//! reverse proxy to an upstream HTTP application.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Extension;
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tower::Service;

use crate::server::{plain, AtlsPeer};

/// Largest body the built-in `/echo` returns.
const MAX_ECHO: usize = 1024 * 1024;

/// Media type of a PEM certificate chain (RFC 8555 §9.1).
pub const CONTENT_TYPE_PEM_CHAIN: &str = "application/pem-certificate-chain";

/// `GET /hello` → `hello`; `POST /echo` → the body; `GET /session` → JSON
/// describing the ATLS session of the request.
pub fn builtin() -> Router {
    builtin_with_trust_anchors(None)
}

/// [`builtin`], and with `trust_anchors` (PEM certificates) also `GET
/// /trust-anchors` → them, as `application/pem-certificate-chain`: the
/// local domain's trust anchors a client bootstraps from over ATLS when it
/// cannot yet validate the domain's TLS-intercepting middlebox (draft §3.2).
/// ATLS authenticates the answer end to end, so the middlebox cannot
/// substitute its own.
pub fn builtin_with_trust_anchors(trust_anchors: Option<bytes::Bytes>) -> Router {
    let router = Router::new();
    let router = match trust_anchors {
        Some(pem) => router.route(
            "/trust-anchors",
            get(move || {
                let pem = pem.clone();
                async move {
                    let mut r = Response::new(Body::from(pem));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(CONTENT_TYPE_PEM_CHAIN),
                    );
                    r
                }
            }),
        ),
        None => router,
    };
    router
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/echo",
            post(|body: Body| async move {
                match Limited::new(body, MAX_ECHO).collect().await {
                    Ok(b) => Response::new(Body::from(b.to_bytes())),
                    Err(_) => plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
                }
            }),
        )
        .route("/session", get(session))
}

async fn session(peer: Option<Extension<AtlsPeer>>) -> Response<Body> {
    let Some(Extension(peer)) = peer else {
        return plain(StatusCode::FORBIDDEN, "no ATLS session");
    };
    let json = serde_json::to_vec(&peer).unwrap_or_default();
    let mut r = Response::new(Body::from(json));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "early-data",
];

/// A reverse proxy: every inner request goes to `upstream` (scheme, host,
/// port and an optional path prefix), with the ATLS peer described in
/// `ATLS-*` request headers the upstream can trust as far as it trusts this
/// hop. Early-data requests carry `Early-Data: 1` (RFC 8470).
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    base: reqwest::Url,
    limit: usize,
    timeout: std::time::Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &redact_url(self.base.as_str()))
            .field("limit", &self.limit)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A proxy to `base`.
    pub fn new(base: &str) -> Result<Self, String> {
        let shown = redact_url(base);
        let base = reqwest::Url::parse(base).map_err(|e| format!("upstream URL {shown}: {e}"))?;
        if base.scheme() != "http" {
            return Err(format!(
                "upstream URL {shown}: only http:// upstreams are supported"
            ));
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(
                crate::client::transport_tls(&crate::ClientOptions::default()).map_err(|e| e.to_string())?,
            )
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            base,
            limit: 4 * 1024 * 1024,
            timeout: std::time::Duration::from_secs(30),
        })
    }

    /// How long the upstream may take to answer (head and body); then the
    /// client gets `504 Gateway Timeout` (30 s by default).
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bound request and response bodies by `limit` bytes (4 MiB by
    /// default; `atls serve` passes the larger of `--max-request` and
    /// `--max-response`).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    async fn forward(self, request: Request<Body>) -> Response<Body> {
        let peer = request.extensions().get::<AtlsPeer>().cloned();
        if let Err(reason) = check_path(request.uri().path()) {
            return plain(StatusCode::BAD_REQUEST, reason);
        }
        let (parts, body) = request.into_parts();
        let Ok(body) = Limited::new(body, self.limit)
            .collect()
            .await
            .map(|b| b.to_bytes())
        else {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        };
        let mut url = self.base.clone();
        let prefix = self.base.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{}", parts.uri.path()));
        url.set_query(parts.uri.query());
        let mut builder = self.client.request(parts.method, url);
        for (name, value) in &parts.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) && !name.as_str().starts_with("atls-") {
                builder = builder.header(name, value);
            }
        }
        if parts.headers.contains_key("early-data") {
            builder = builder.header("early-data", "1");
        }
        if let Some(peer) = peer {
            builder = builder
                .header("atls-mode", peer.mode.name())
                .header("atls-tls-version", peer.tls_version)
                .header("atls-cipher-suite", peer.cipher_suite.as_str());
            if let crate::server::PeerSummary::Psk { identity } = &peer.peer {
                if let Ok(v) = HeaderValue::from_str(identity) {
                    builder = builder.header("atls-psk-identity", v);
                }
            }
        }
        let timeout = self.timeout;
        let limit = self.limit;
        let base = self.base.clone();
        let exchange = async move {
            let response = match builder.body(body).send().await {
                Ok(r) => r,
                Err(e) => {
                    // Without the URL: it may carry the upstream's password.
                    tracing::warn!(upstream = %redact_url(base.as_str()), error = %e.without_url(), "upstream request failed");
                    return Err(plain(StatusCode::BAD_GATEWAY, "upstream unreachable"));
                }
            };
            let status = response.status();
            let headers = response.headers().clone();
            let mut response = response;
            let mut body = Vec::new();
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) if body.len() + chunk.len() > limit => {
                        return Err(plain(
                            StatusCode::BAD_GATEWAY,
                            &format!("the upstream response exceeds {limit} bytes"),
                        ));
                    }
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(_) => return Err(plain(StatusCode::BAD_GATEWAY, "upstream response failed")),
                }
            }
            Ok((status, headers, body))
        };
        let (status, headers, body) = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(reply)) => return reply,
            Err(_) => {
                tracing::warn!(upstream = %redact_url(self.base.as_str()), timeout_ms = timeout.as_millis() as u64, "upstream did not answer in time");
                return plain(StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time");
            }
        };
        let mut out = Response::new(Body::from(body));
        *out.status_mut() = status;
        for (name, value) in &headers {
            if !HOP_BY_HOP.contains(&name.as_str()) {
                out.headers_mut().append(name, value.clone());
            }
        }
        out
    }
}

/// `url` as logs and messages may show it: a password in its userinfo is
/// replaced by `***` (the user name is kept); a user name alone, often a
/// token itself (`https://TOKEN@host/`), is replaced. Text that does not
/// parse as a URL (a bad port, no scheme, an unencoded `#` in the password)
/// is redacted by hand: whatever comes before the last `@` of its authority.
pub fn redact_url(url: &str) -> String {
    // No `@`, no userinfo: nothing to parse (the common case, on every
    // forwarded exchange's log line).
    if !url.contains('@') {
        return url.to_owned();
    }
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(mut parsed) if !parsed.username().is_empty() => {
            let _ = parsed.set_username("***");
            parsed.to_string()
        }
        Ok(parsed) if parsed.has_host() => url.to_owned(),
        _ => redact_text(url),
    }
}

/// The userinfo of URL-like text masked: from the start of the authority
/// (after `://`, or the start) to the last `@` (the userinfo may hold `/`,
/// `?` or `#` unencoded; an `@` in a path masks too much, never too little).
fn redact_text(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = url.get(start..).unwrap_or_default();
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = rest.get(..at).unwrap_or_default();
    let shown = match userinfo.split_once(':') {
        Some((user, _)) if !user.is_empty() => format!("{user}:***"),
        _ => "***".to_owned(),
    };
    format!(
        "{}{shown}{}",
        url.get(..start).unwrap_or_default(),
        rest.get(at..).unwrap_or_default()
    )
}

/// Refuse a path that could leave the upstream's prefix, however the
/// upstream reads it: a `.` or `..` segment, literal or percent-encoded
/// (`%2e`), also with path parameters (`..;x`, which Java servers read as
/// `..`); encoded or backslash separators; and encodings some servers decode
/// a second time or leniently: `%25` (double encoding), `%00`, `%u` escapes,
/// and overlong UTF-8 (`%c0%ae`). The URL parser alone would resolve `/app` +
/// `/../admin` to `/admin`.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if path.contains('\\') {
        return Err("the request path contains a backslash");
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%25") || lower.contains("%u") || lower.contains("%00") {
        return Err("the request path contains a double or non-standard encoding");
    }
    for segment in path.split('/') {
        let decoded = percent_decode(segment);
        // Overlong and other invalid UTF-8 (`%c0%ae`, `%e0%80%ae`) is
        // refused too: lenient decoders read it as `.`.
        if decoded.iter().any(|b| matches!(b, b'/' | b'\\' | 0)) || std::str::from_utf8(&decoded).is_err() {
            return Err("the request path contains an encoded separator or an invalid encoding");
        }
        let name = decoded.split(|b| *b == b';').next().unwrap_or_default();
        if name == b"." || name == b".." {
            return Err("the request path contains a dot segment");
        }
    }
    Ok(())
}

/// RFC 3986 percent-decoding of one segment (invalid escapes stay as they are).
fn percent_decode(segment: &str) -> Vec<u8> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(request).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(redact_url("http://u:s3cret@h:8/p?q"), "http://u:***@h:8/p?q");
        assert_eq!(redact_url("https://ghp_token@h/"), "https://***@h/");
        assert_eq!(redact_url("http://h/x"), "http://h/x");
        assert_eq!(redact_url("not a url"), "not a url");
        // Text that does not parse as a URL is redacted by hand.
        assert_eq!(redact_url("user:s3cret@host:8080"), "user:***@host:8080");
        assert_eq!(redact_url("http://u:s3cret@h:99999/"), "http://u:***@h:99999/");
        assert_eq!(redact_url("http://u:pa#ss@h/"), "http://u:***@h/");
        assert_eq!(redact_url("http://u:pa/ss@h/x"), "http://u:***@h/x");
    }

    #[test]
    fn paths_that_could_climb_out_of_the_prefix_are_refused() {
        for bad in [
            "/../admin",
            "/a/../../admin",
            "/..",
            "/./x",
            "/%2e%2e/admin",
            "/%2E%2E/admin",
            "/.%2e/admin",
            "/%2e./admin",
            "/a/%2e",
            "/..%2fadmin",
            "/..%2Fadmin",
            "/a%5c..%5cadmin",
            "/a\\..\\admin",
            "/..;/admin",
            "/a/..;x=1/..;/admin",
            "/..%3b/admin",
            "/%252e%252e/admin",
            "/%c0%ae%c0%ae/admin",
            "/%C0%AE./admin",
            "/%e0%80%ae%e0%80%ae/admin",
            "/%f0%80%80%ae/admin",
            "/%u002e%u002e/admin",
            "/.%00./admin",
            "/..%00/admin",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in [
            "/",
            "/echo",
            "/a/b.c/..d",
            "/%41",
            "/...",
            "/a/.hidden",
            "/a;b/c",
            "/%e2%82%ac",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }
}
