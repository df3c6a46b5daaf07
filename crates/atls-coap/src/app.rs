//! The built-in resources, as the HTTP side has them: `GET /hello`,
//! `POST /echo`, `GET /session` (JSON about the ATLS session).

use atls_core::HandshakeInfo;
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

fn path(request: &Packet) -> Vec<String> {
    request
        .get_option(CoapOption::UriPath)
        .map(|segments| {
            segments
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn response(code: ResponseType, payload: Vec<u8>) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(code);
    p.payload = payload;
    p
}

/// Answer an inner (decrypted) request of an OSCORE exchange.
pub fn builtin(request: &Packet, info: Option<&HandshakeInfo>, engine: &str) -> Packet {
    builtin_in_mode(request, info, engine, "oscore")
}

/// Answer an inner request that arrived protected by `mode` ("oscore",
/// "records").
pub fn builtin_in_mode(request: &Packet, info: Option<&HandshakeInfo>, engine: &str, mode: &str) -> Packet {
    let method = match request.header.code {
        MessageClass::Request(m) => m,
        _ => return response(ResponseType::BadRequest, b"not a request".to_vec()),
    };
    let path = path(request);
    match (
        method,
        path.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
    ) {
        (RequestType::Get, ["hello"]) => response(ResponseType::Content, b"hello".to_vec()),
        (RequestType::Post, ["echo"]) => response(ResponseType::Changed, request.payload.clone()),
        (RequestType::Get, ["session"]) => {
            let json = info.map(|i| {
                serde_json::json!({
                    "mode": mode,
                    "transport": "coap",
                    "engine": engine,
                    "tls_version": i.version.name(),
                    "cipher_suite": i.cipher_suite.to_string(),
                    "cids_negotiated": i.oscore_cids.is_negotiated(),
                    "resumed": i.resumed,
                })
            });
            let mut p = response(
                ResponseType::Content,
                json.map(|j| j.to_string().into_bytes()).unwrap_or_default(),
            );
            p.add_option(CoapOption::ContentFormat, vec![50]);
            p
        }
        (_, ["hello"] | ["echo"] | ["session"]) => response(ResponseType::MethodNotAllowed, Vec::new()),
        _ => response(ResponseType::NotFound, Vec::new()),
    }
}
