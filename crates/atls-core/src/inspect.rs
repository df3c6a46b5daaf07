//! What a middlebox can read from an ATLS payload without any key
//! (draft §5.1.2, §5.1.4, §5.1.5).
//!
//! [`inspect`] splits a payload into records and decodes the handshake
//! messages that travel in the clear: the ClientHello (SNI, offered versions,
//! cipher suites, the ATLS extensions with their CIDs) and the ServerHello.
//! It never panics and never allocates more than a small multiple of the
//! input, whatever the input is.

use std::fmt;

use tls_parser::{DTLSMessage, DTLSMessageHandshakeBody};

use crate::ext::{ConnectionId, DEFAULT_COSE_EXTENSION, DEFAULT_OSCORE_CID_EXTENSION};
use crate::records::{detect_framing, ContentType, Framing, MAX_RECORDS_PER_FLIGHT};
use crate::suites::CipherSuite;

/// Largest handshake stream reassembled for inspection.
const MAX_REASSEMBLY: usize = 64 * 1024;

/// One record as seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSummary {
    /// Content type, when it is one this inspector knows.
    pub content_type: Option<ContentType>,
    /// The content type byte (shown for unknown types too: a middlebox must
    /// not constrain the TLS stack, §5.1.4).
    pub content_type_code: u8,
    /// Record-layer version.
    pub version: u16,
    /// DTLS epoch (0 for TLS).
    pub epoch: u16,
    /// DTLS sequence number (0 for TLS).
    pub sequence: u64,
    /// Body length.
    pub length: usize,
}

/// A ClientHello's middlebox-visible fields.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ClientHelloSummary {
    /// legacy_version.
    pub legacy_version: u16,
    /// SNI host name.
    pub server_name: Option<String>,
    /// supported_versions, or legacy_version alone when absent.
    pub versions: Vec<u16>,
    /// Offered cipher suites.
    pub cipher_suites: Vec<CipherSuite>,
    /// Extension types in order.
    pub extensions: Vec<u16>,
    /// CID in `oscore_connection_id`, if offered.
    pub oscore_cid: Option<ConnectionId>,
    /// CID in `cose_ext`, if offered.
    pub cose_cid: Option<ConnectionId>,
}

/// A ServerHello's middlebox-visible fields.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServerHelloSummary {
    /// The selected version (supported_versions when present).
    pub version: u16,
    /// The selected cipher suite.
    pub cipher_suite: CipherSuite,
    /// Extension types in order.
    pub extensions: Vec<u16>,
    /// CID in `oscore_connection_id` (TLS/DTLS 1.2 only: TLS 1.3 sends it encrypted).
    pub oscore_cid: Option<ConnectionId>,
    /// CID in `cose_ext` (likewise).
    pub cose_cid: Option<ConnectionId>,
}

/// A handshake message sent in the clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeSummary {
    /// ClientHello with its fields.
    ClientHello(ClientHelloSummary),
    /// ServerHello with its fields.
    ServerHello(ServerHelloSummary),
    /// Any other message: its type and length.
    Other {
        /// Handshake message type.
        msg_type: u8,
        /// Body length.
        length: usize,
    },
    /// A message that could not be decoded (truncated, fragmented or malformed).
    Undecodable {
        /// Handshake message type, when at least that was present.
        msg_type: Option<u8>,
        /// Why.
        reason: &'static str,
    },
}

/// Everything [`inspect`] found in a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// TLS or DTLS, when recognisable.
    pub framing: Option<Framing>,
    /// The records.
    pub records: Vec<RecordSummary>,
    /// Handshake messages decoded from plaintext records.
    pub handshake: Vec<HandshakeSummary>,
    /// Why parsing stopped early, if it did.
    pub error: Option<String>,
}

impl Inspection {
    /// The first ClientHello, if any.
    pub fn client_hello(&self) -> Option<&ClientHelloSummary> {
        self.handshake.iter().find_map(|h| match h {
            HandshakeSummary::ClientHello(ch) => Some(ch),
            _ => None,
        })
    }

    /// The first ServerHello, if any.
    pub fn server_hello(&self) -> Option<&ServerHelloSummary> {
        self.handshake.iter().find_map(|h| match h {
            HandshakeSummary::ServerHello(sh) => Some(sh),
            _ => None,
        })
    }
}

/// Which code points to read as the ATLS extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InspectOptions {
    /// `oscore_connection_id` code point.
    pub oscore_code_point: u16,
    /// `cose_ext` code point.
    pub cose_code_point: u16,
}

impl Default for InspectOptions {
    fn default() -> Self {
        Self {
            oscore_code_point: DEFAULT_OSCORE_CID_EXTENSION,
            cose_code_point: DEFAULT_COSE_EXTENSION,
        }
    }
}

/// Inspect an ATLS payload with the default extension code points.
pub fn inspect(payload: &[u8]) -> Inspection {
    inspect_with(payload, InspectOptions::default())
}

/// Inspect an ATLS payload.
pub fn inspect_with(payload: &[u8], options: InspectOptions) -> Inspection {
    let mut result = Inspection {
        framing: detect_lenient(payload),
        records: Vec::new(),
        handshake: Vec::new(),
        error: None,
    };
    let Some(framing) = result.framing else {
        result.error = Some("not a TLS or DTLS record".into());
        return result;
    };
    // Split as far as the record headers hold, then report the error.
    // Content types and versions this inspector does not know are shown,
    // not refused (§5.1.4).
    let (records, error) = split_lenient(framing, payload);
    result.error = error;
    let mut tls_stream: Vec<u8> = Vec::new();
    let mut tls_stream_open = true;
    for record in &records {
        let content_type = ContentType::from_u8(record.code);
        result.records.push(RecordSummary {
            content_type,
            content_type_code: record.code,
            version: record.version,
            epoch: record.epoch,
            sequence: record.sequence,
            length: record.body.len(),
        });
        let Some(content_type) = content_type else {
            continue;
        };
        match (framing, content_type) {
            (Framing::Dtls, ContentType::Handshake) if record.epoch == 0 => {
                result.handshake.push(dtls_handshake(record.body, options));
            }
            (Framing::Tls, ContentType::Handshake)
                if tls_stream_open
                    && tls_stream.len().saturating_add(record.body.len()) <= MAX_REASSEMBLY =>
            {
                tls_stream.extend_from_slice(record.body);
            }
            // After ChangeCipherSpec or encrypted records, handshake bytes are ciphertext.
            (Framing::Tls, ContentType::ChangeCipherSpec | ContentType::ApplicationData) => {
                tls_stream_open = false
            }
            _ => {}
        }
    }
    tls_handshake_messages(&tls_stream, options, &mut result.handshake);
    result
}

/// The framing of a payload from its first record header's version: any
/// 0x03xx is TLS, any 0xFExx DTLS (versions not known yet included).
fn detect_lenient(payload: &[u8]) -> Option<Framing> {
    match payload.get(1)? {
        0x03 if payload.len() >= 5 => Some(Framing::Tls),
        0xFE if payload.len() >= 13 => Some(Framing::Dtls),
        _ => detect_framing(payload),
    }
}

/// A record header and body, whatever its content type and version.
struct RawRecord<'a> {
    code: u8,
    version: u16,
    epoch: u16,
    sequence: u64,
    body: &'a [u8],
}

/// Split `payload` into records by their headers alone; stops at the first
/// truncated record (reported) or after `MAX_RECORDS_PER_FLIGHT`.
fn split_lenient(framing: Framing, payload: &[u8]) -> (Vec<RawRecord<'_>>, Option<String>) {
    let header: usize = match framing {
        Framing::Tls => 5,
        Framing::Dtls => 13,
    };
    let mut records = Vec::new();
    let mut rest = payload;
    let mut offset = 0usize;
    while !rest.is_empty() {
        if records.len() >= MAX_RECORDS_PER_FLIGHT {
            return (
                records,
                Some(format!("more than {MAX_RECORDS_PER_FLIGHT} records")),
            );
        }
        let truncated = || Some(format!("record at offset {offset} is truncated"));
        let (Some(head), Some(tail)) = (rest.get(..header), rest.get(header..)) else {
            return (records, truncated());
        };
        let byte = |i: usize| head.get(i).copied().unwrap_or(0);
        let len = usize::from(u16::from_be_bytes([
            byte(header.saturating_sub(2)),
            byte(header.saturating_sub(1)),
        ]));
        let (Some(body), Some(after)) = (tail.get(..len), tail.get(len..)) else {
            return (records, truncated());
        };
        let (epoch, sequence) = match framing {
            Framing::Tls => (0, 0),
            Framing::Dtls => (
                u16::from_be_bytes([byte(3), byte(4)]),
                (5..11).fold(0u64, |a, i| (a << 8) | u64::from(byte(i))),
            ),
        };
        records.push(RawRecord {
            code: byte(0),
            version: u16::from_be_bytes([byte(1), byte(2)]),
            epoch,
            sequence,
            body,
        });
        offset = offset.saturating_add(header).saturating_add(len);
        rest = after;
    }
    (records, None)
}

fn tls_handshake_messages(mut stream: &[u8], options: InspectOptions, out: &mut Vec<HandshakeSummary>) {
    while let Some((&msg_type, rest)) = stream.split_first() {
        let Some(len_bytes) = rest.get(..3) else {
            out.push(HandshakeSummary::Undecodable {
                msg_type: Some(msg_type),
                reason: "truncated handshake header",
            });
            return;
        };
        let length = be24(len_bytes);
        let Some(body) = rest.get(3..3usize.saturating_add(length)) else {
            out.push(HandshakeSummary::Undecodable {
                msg_type: Some(msg_type),
                reason: "truncated handshake message",
            });
            return;
        };
        out.push(match msg_type {
            1 => match tls_parser::parse_tls_handshake_client_hello(body) {
                Ok((_, ch)) => HandshakeSummary::ClientHello(client_hello(
                    ch.version.0,
                    ch.ciphers.iter().map(|c| c.0),
                    ch.ext,
                    options,
                )),
                Err(_) => HandshakeSummary::Undecodable {
                    msg_type: Some(1),
                    reason: "malformed ClientHello",
                },
            },
            2 => match tls_parser::parse_tls_handshake_server_hello(body) {
                Ok((_, sh)) => {
                    HandshakeSummary::ServerHello(server_hello(sh.version.0, sh.cipher.0, sh.ext, options))
                }
                Err(_) => HandshakeSummary::Undecodable {
                    msg_type: Some(2),
                    reason: "malformed ServerHello",
                },
            },
            other => HandshakeSummary::Other {
                msg_type: other,
                length,
            },
        });
        stream = rest.get(3usize.saturating_add(length)..).unwrap_or_default();
    }
}

fn dtls_handshake(body: &[u8], options: InspectOptions) -> HandshakeSummary {
    let msg_type = body.first().copied();
    match tls_parser::parse_dtls_message_handshake(body) {
        Ok((_, DTLSMessage::Handshake(msg))) => match msg.body {
            DTLSMessageHandshakeBody::ClientHello(ch) => HandshakeSummary::ClientHello(client_hello(
                ch.version.0,
                ch.ciphers.iter().map(|c| c.0),
                ch.ext,
                options,
            )),
            DTLSMessageHandshakeBody::ServerHello(sh) => {
                HandshakeSummary::ServerHello(server_hello(sh.version.0, sh.cipher.0, sh.ext, options))
            }
            DTLSMessageHandshakeBody::Fragment(_) => HandshakeSummary::Undecodable {
                msg_type,
                reason: "fragment of a larger handshake message",
            },
            _ => HandshakeSummary::Other {
                msg_type: msg.msg_type.0,
                length: usize::try_from(msg.length).unwrap_or(usize::MAX),
            },
        },
        _ => HandshakeSummary::Undecodable {
            msg_type,
            reason: "malformed DTLS handshake message",
        },
    }
}

fn be24(b: &[u8]) -> usize {
    b.iter()
        .take(3)
        .fold(0usize, |acc, &x| (acc << 8) | usize::from(x))
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// Walk an extensions block: `(type, body)` pairs, stopping at the first malformed entry.
fn extensions(mut block: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while block.len() >= 4 {
        let (Some(ty), Some(len)) = (be16(block), block.get(2..4).and_then(be16)) else {
            break;
        };
        let end = 4usize.saturating_add(usize::from(len));
        let Some(body) = block.get(4..end) else {
            break;
        };
        out.push((ty, body));
        block = block.get(end..).unwrap_or_default();
    }
    out
}

fn client_hello(
    legacy_version: u16,
    ciphers: impl Iterator<Item = u16>,
    ext: Option<&[u8]>,
    options: InspectOptions,
) -> ClientHelloSummary {
    let mut summary = ClientHelloSummary {
        legacy_version,
        cipher_suites: ciphers.map(CipherSuite).collect(),
        versions: vec![legacy_version],
        ..Default::default()
    };
    for (ty, body) in extensions(ext.unwrap_or_default()) {
        summary.extensions.push(ty);
        match ty {
            0 => {
                if let Ok((_, tls_parser::TlsExtension::SNI(names))) =
                    tls_parser::parse_tls_extension_sni_content(body)
                {
                    summary.server_name = names
                        .iter()
                        .find(|(kind, _)| kind.0 == 0)
                        .map(|(_, name)| String::from_utf8_lossy(name).into_owned());
                }
            }
            43 => {
                // ProtocolVersion versions<2..254>
                if let Some((_, list)) = body.split_first() {
                    summary.versions = list.chunks_exact(2).filter_map(be16).collect();
                }
            }
            t if t == options.oscore_code_point => summary.oscore_cid = ConnectionId::decode(body),
            t if t == options.cose_code_point => summary.cose_cid = ConnectionId::decode(body),
            _ => {}
        }
    }
    summary
}

fn server_hello(
    version: u16,
    cipher: u16,
    ext: Option<&[u8]>,
    options: InspectOptions,
) -> ServerHelloSummary {
    let mut summary = ServerHelloSummary {
        version,
        cipher_suite: CipherSuite(cipher),
        ..Default::default()
    };
    for (ty, body) in extensions(ext.unwrap_or_default()) {
        summary.extensions.push(ty);
        match ty {
            43 => {
                if let Some(v) = be16(body) {
                    summary.version = v;
                }
            }
            t if t == options.oscore_code_point => summary.oscore_cid = ConnectionId::decode(body),
            t if t == options.cose_code_point => summary.cose_cid = ConnectionId::decode(body),
            _ => {}
        }
    }
    summary
}

/// A readable name for a record/handshake version number.
pub fn version_name(version: u16) -> &'static str {
    match version {
        0x0300 => "SSLv3",
        0x0301 => "TLSv1.0",
        0x0302 => "TLSv1.1",
        0x0303 => "TLSv1.2",
        0x0304 => "TLSv1.3",
        0xFEFF => "DTLSv1.0",
        0xFEFD => "DTLSv1.2",
        0xFEFC => "DTLSv1.3",
        _ => "unknown",
    }
}

/// A readable name for a handshake message type.
pub fn handshake_type_name(msg_type: u8) -> &'static str {
    match msg_type {
        0 => "hello_request",
        1 => "client_hello",
        2 => "server_hello",
        3 => "hello_verify_request",
        4 => "new_session_ticket",
        5 => "end_of_early_data",
        8 => "encrypted_extensions",
        11 => "certificate",
        12 => "server_key_exchange",
        13 => "certificate_request",
        14 => "server_hello_done",
        15 => "certificate_verify",
        16 => "client_key_exchange",
        20 => "finished",
        24 => "key_update",
        _ => "unknown",
    }
}

/// A connection ID as CBOR diagnostic bytes (`h'c1'`), or `not offered`.
fn cid_text(cid: Option<&ConnectionId>) -> String {
    match cid {
        Some(c) => {
            let hex: String = c.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
            format!("h'{hex}'")
        }
        None => "not offered".into(),
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.records {
            write!(
                f,
                "  {} {} len={}",
                r.content_type
                    .map(|t| t.name().to_owned())
                    .unwrap_or_else(|| format!("unknown({})", r.content_type_code)),
                match version_name(r.version) {
                    "unknown" => format!("unknown(0x{:04x})", r.version),
                    name => name.to_owned(),
                },
                r.length
            )?;
            if self.framing == Some(Framing::Dtls) {
                write!(f, " epoch={} seq={}", r.epoch, r.sequence)?;
            }
            writeln!(f)?;
        }
        for h in &self.handshake {
            match h {
                HandshakeSummary::ClientHello(ch) => {
                    match &ch.server_name {
                        Some(name) => writeln!(f, "  ClientHello, SNI {name}")?,
                        None => writeln!(f, "  ClientHello, no SNI")?,
                    }
                    let versions: Vec<_> = ch.versions.iter().map(|v| version_name(*v)).collect();
                    writeln!(f, "    versions: {}", versions.join(", "))?;
                    let suites: Vec<_> = ch.cipher_suites.iter().map(|s| s.to_string()).collect();
                    writeln!(f, "    cipher suites: {}", suites.join(", "))?;
                    writeln!(
                        f,
                        "    oscore_connection_id: {}  cose_ext: {}",
                        cid_text(ch.oscore_cid.as_ref()),
                        cid_text(ch.cose_cid.as_ref())
                    )?;
                }
                HandshakeSummary::ServerHello(sh) => {
                    writeln!(
                        f,
                        "  ServerHello {} {}",
                        version_name(sh.version),
                        sh.cipher_suite
                    )?;
                    writeln!(
                        f,
                        "    oscore_connection_id: {}  cose_ext: {}",
                        cid_text(sh.oscore_cid.as_ref()),
                        cid_text(sh.cose_cid.as_ref())
                    )?;
                }
                HandshakeSummary::Other { msg_type, length } => {
                    writeln!(f, "  {} ({length} bytes)", handshake_type_name(*msg_type))?;
                }
                HandshakeSummary::Undecodable { msg_type, reason } => match msg_type {
                    Some(t) => writeln!(f, "  undecodable {}: {reason}", handshake_type_name(*t))?,
                    None => writeln!(f, "  undecodable handshake message: {reason}")?,
                },
            }
        }
        if let Some(e) = &self.error {
            writeln!(f, "  stopped: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn garbage_is_reported_not_parsed() {
        let i = inspect(b"GET / HTTP/1.1\r\n");
        assert_eq!(i.framing, None);
        assert!(i.error.is_some());
        assert!(i.records.is_empty());
    }

    #[test]
    fn truncated_record_keeps_the_valid_prefix() {
        let payload = [21, 3, 3, 0, 2, 2, 40, 22, 3, 3, 0, 9, 1];
        let i = inspect(&payload);
        assert_eq!(i.records.len(), 1);
        assert_eq!(i.records[0].content_type, Some(ContentType::Alert));
        assert!(i.error.expect("error").contains("truncated"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics_on_random_input(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = inspect(&bytes);
        }

        #[test]
        fn never_panics_on_plausible_headers(
            ty in 20u8..27,
            dtls in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![ty];
            bytes.extend_from_slice(if dtls { &[0xFE, 0xFD] } else { &[3, 3] });
            bytes.extend_from_slice(&tail);
            let _ = inspect(&bytes);
        }
    }
}
