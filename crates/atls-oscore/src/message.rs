//! Protecting and verifying CoAP messages (RFC 8613 §4–§8).

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use crate::context::{aad, nonce, ReplayWindow, SecurityContext};
use crate::error::OscoreError;
use crate::option::{seq_from_piv, OptionRef, OscoreOption};

/// CoAP option number of OSCORE.
pub const OPTION_OSCORE: u16 = 9;
/// CoAP option number of Echo (RFC 9175).
pub const OPTION_ECHO: u16 = 252;
const OPTION_OBSERVE: u16 = 6;
/// Default largest payload a [`SecurityContext`] protects or accepts
/// ([`SecurityContext::set_max_message`] changes it per context).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Room in a ciphertext for the inner code, Class E options and payload
/// marker beyond the payload itself (and the tag).
const INNER_OVERHEAD: usize = 8 * 1024;

const TOO_LARGE: OscoreError = OscoreError::Decode("message too large");

/// Refuse a message whose payload exceeds the context's cap, or whose
/// encoded inner message leaves no room for it (`inner_len`: the plaintext
/// or ciphertext length, `tag`: the tag it carries).
fn check_size(
    ctx: &SecurityContext,
    payload_len: usize,
    inner_len: usize,
    tag: usize,
) -> Result<(), OscoreError> {
    let limit = ctx.max_message();
    if payload_len > limit || inner_len > limit.saturating_add(INNER_OVERHEAD).saturating_add(tag) {
        return Err(TOO_LARGE);
    }
    Ok(())
}

/// Class U options: outer only (RFC 8613 §4.1, Figure 5).
fn is_outer_only(number: u16) -> bool {
    matches!(number, 3 | 7 | OPTION_OSCORE | 35 | 39)
}

/// What a response is bound to: the request's kid and Partial IV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestBinding {
    /// The requester's Sender ID.
    pub kid: Vec<u8>,
    /// The request's Partial IV.
    pub piv: Vec<u8>,
}

/// Append one CoAP option (RFC 7252 §3.1) after option number `previous`.
fn encode_option(out: &mut Vec<u8>, previous: u16, number: u16, value: &[u8]) {
    fn nibble(v: usize, ext: &mut [u8; 2]) -> (u8, usize) {
        match v {
            0..=12 => (v as u8, 0),
            13..=268 => {
                ext[0] = (v - 13) as u8;
                (13, 1)
            }
            _ => {
                *ext = ((v - 269) as u16).to_be_bytes();
                (14, 2)
            }
        }
    }
    let (mut dext, mut lext) = ([0u8; 2], [0u8; 2]);
    let (d, dn) = nibble(usize::from(number - previous), &mut dext);
    let (l, ln) = nibble(value.len(), &mut lext);
    out.push((d << 4) | l);
    out.extend_from_slice(&dext[..dn]);
    out.extend_from_slice(&lext[..ln]);
    out.extend_from_slice(value);
}

/// Code || Class E options || 0xFF || payload (§5.3), encoded directly.
fn encode_plaintext(message: &Packet) -> Result<Vec<u8>, OscoreError> {
    let mut out = Vec::with_capacity(message.payload.len() + 64);
    out.push(u8::from(message.header.code));
    let mut previous = 0u16;
    for (number, values) in message.options() {
        if is_outer_only(*number) {
            continue;
        }
        for value in values {
            if value.len() > 65_000 {
                return Err(OscoreError::Coap("option value too long".into()));
            }
            encode_option(&mut out, previous, *number, value);
            previous = *number;
        }
    }
    if !message.payload.is_empty() {
        out.push(0xFF);
        out.extend_from_slice(&message.payload);
    }
    Ok(out)
}

/// Strictly parse CoAP options and the payload marker (RFC 7252 §3.1):
/// reserved nibbles, truncated extensions and an empty payload after the
/// marker are message format errors (coap-lite's own parser is more
/// lenient). Returns the options in order and the payload.
/// Inner options (number, value) in order, and the payload.
type ParsedOptions<'a> = (Vec<(u16, &'a [u8])>, &'a [u8]);

fn parse_options(mut bytes: &[u8]) -> Result<ParsedOptions<'_>, OscoreError> {
    const BAD: OscoreError = OscoreError::Decode("malformed inner CoAP options");
    let mut options = Vec::new();
    let mut number = 0u16;
    while let Some((&first, rest)) = bytes.split_first() {
        if first == 0xFF {
            return if rest.is_empty() {
                Err(BAD)
            } else {
                Ok((options, rest))
            };
        }
        let (delta, len) = (first >> 4, first & 0x0F);
        if delta == 15 || len == 15 {
            return Err(BAD);
        }
        let mut rest = rest;
        let mut extended = |nibble: u8| -> Result<usize, OscoreError> {
            match nibble {
                13 => {
                    let (&b, r) = rest.split_first().ok_or(BAD)?;
                    rest = r;
                    Ok(usize::from(b) + 13)
                }
                14 => {
                    let b = rest.get(..2).ok_or(BAD)?;
                    let v = usize::from(u16::from_be_bytes([b[0], b[1]])) + 269;
                    rest = &rest[2..];
                    Ok(v)
                }
                n => Ok(usize::from(n)),
            }
        };
        let delta = extended(delta)?;
        let value_len = extended(len)?;
        number = u16::try_from(usize::from(number) + delta).map_err(|_| BAD)?;
        let value = rest.get(..value_len).ok_or(BAD)?;
        options.push((number, value));
        bytes = &rest[value_len..];
    }
    Ok((options, &[]))
}

/// Rebuild a message from the outer message and the decrypted plaintext.
fn decode_plaintext(outer: &Packet, plaintext: &[u8]) -> Result<Packet, OscoreError> {
    let (&code, rest) = plaintext
        .split_first()
        .ok_or(OscoreError::Decode("empty plaintext"))?;
    let (options, payload) = parse_options(rest)?;
    let mut out = Packet::new();
    out.header = outer.header.clone();
    out.header.code = MessageClass::from(code);
    out.set_token(outer.get_token().to_vec());
    for (number, values) in outer.options() {
        if is_outer_only(*number) && *number != OPTION_OSCORE {
            for value in values {
                out.add_option(CoapOption::from(*number), value.clone());
            }
        }
    }
    for (number, value) in options {
        if !is_outer_only(number) {
            out.add_option(CoapOption::from(number), value.to_vec());
        }
    }
    out.payload = payload.to_vec();
    Ok(out)
}

/// The outer message around a ciphertext.
fn outer_message(original: &Packet, is_request: bool, option: Vec<u8>, ciphertext: Vec<u8>) -> Packet {
    let mut out = Packet::new();
    out.header = original.header.clone();
    out.set_token(original.get_token().to_vec());
    let observe = original.get_option(CoapOption::Observe).is_some();
    out.header.code = match (is_request, observe) {
        (true, false) => MessageClass::Request(RequestType::Post),
        (true, true) => MessageClass::Request(RequestType::Fetch),
        (false, false) => MessageClass::Response(ResponseType::Changed),
        (false, true) => MessageClass::Response(ResponseType::Content),
    };
    for (number, values) in original.options() {
        if (is_outer_only(*number) && *number != OPTION_OSCORE) || *number == OPTION_OBSERVE {
            for value in values {
                out.add_option(CoapOption::from(*number), value.clone());
            }
        }
    }
    out.add_option(CoapOption::Oscore, option);
    out.payload = ciphertext;
    out
}

fn option_value(message: &Packet) -> Result<&[u8], OscoreError> {
    let values = message
        .get_option(CoapOption::Oscore)
        .ok_or(OscoreError::NotProtected)?;
    if values.len() != 1 {
        return Err(OscoreError::Decode("repeated OSCORE option"));
    }
    Ok(values.front().map(Vec::as_slice).unwrap_or_default())
}

/// The decoded OSCORE option of a message, for looking its context up.
pub fn oscore_option(message: &Packet) -> Result<OscoreOption, OscoreError> {
    OscoreOption::decode(option_value(message)?)
}

/// Protect a CoAP request (§8.1).
pub fn protect_request(
    ctx: &mut SecurityContext,
    request: &Packet,
) -> Result<(Packet, RequestBinding), OscoreError> {
    let mut buf = encode_plaintext(request)?;
    check_size(ctx, request.payload.len(), buf.len(), 0)?;
    let seq = ctx.take_sequence_number()?;
    let piv = SecurityContext::piv(seq);
    let kid = ctx.sender_id();
    // The OSCORE option: flags (k, h, n), Partial IV, kid context, kid (§6.1).
    let mut option = Vec::with_capacity(1 + piv.len() + kid.len() + 1);
    let context = ctx.id_context();
    option.push(u8::try_from(piv.len()).unwrap_or(0) | 0x08 | if context.is_some() { 0x10 } else { 0 });
    option.extend_from_slice(&piv);
    if let Some(c) = context {
        option.push(
            u8::try_from(c.len())
                .map_err(|_| OscoreError::Unsupported("kid context over 255 bytes".into()))?,
        );
        option.extend_from_slice(c);
    }
    option.extend_from_slice(kid);
    buf.reserve(ctx.aead().tag_len());
    let nonce = nonce(kid, &piv, ctx.common_iv())?;
    ctx.seal(&nonce, &aad(ctx.aead().cose_id(), kid, &piv), &mut buf)?;
    let binding = RequestBinding {
        kid: kid.to_vec(),
        piv,
    };
    Ok((outer_message(request, true, option, buf), binding))
}

/// Verify and decrypt a CoAP request (§8.2). The caller found `ctx` by the
/// kid (and kid context) of [`oscore_option`].
pub fn unprotect_request(
    ctx: &mut SecurityContext,
    request: &Packet,
) -> Result<(Packet, RequestBinding), OscoreError> {
    check_size(ctx, 0, request.payload.len(), ctx.aead().tag_len())?;
    let option = OptionRef::parse(option_value(request)?)?;
    let (Some(piv), Some(kid)) = (option.partial_iv, option.kid) else {
        return Err(OscoreError::Decode("a request needs a kid and a Partial IV"));
    };
    if kid != ctx.recipient_id() || option.kid_context.is_some_and(|c| Some(c) != ctx.id_context()) {
        return Err(OscoreError::ContextNotFound);
    }
    if request.payload.is_empty() {
        return Err(OscoreError::Decode("no ciphertext"));
    }
    let seq = seq_from_piv(piv)?;
    let fresh_check = ctx.check_replay(piv);
    if matches!(fresh_check, Err(OscoreError::Replay)) {
        return Err(OscoreError::Replay);
    }
    let mut buf = request.payload.clone();
    let nonce = nonce(kid, piv, ctx.common_iv())?;
    ctx.open(&nonce, &aad(ctx.aead().cose_id(), kid, piv), &mut buf)?;
    let plain = decode_plaintext(request, &buf)?;
    check_size(ctx, plain.payload.len(), 0, 0)?;
    let binding = RequestBinding {
        kid: kid.to_vec(),
        piv: piv.to_vec(),
    };
    if ctx.replay == ReplayWindow::Uninitialized {
        // App. B.1.2: only a request echoing our challenge proves freshness.
        let echoed = plain
            .get_option(CoapOption::Unknown(OPTION_ECHO))
            .and_then(|v| v.front());
        match (&ctx.echo_challenge, echoed) {
            (Some(challenge), Some(echo)) if challenge == echo => {
                // Its Partial IV becomes the lower limit of the window.
                ctx.replay = ReplayWindow::starting_at(ctx.window_size, seq);
                ctx.echo_challenge = None;
                return Ok((plain, binding));
            }
            _ => return Err(OscoreError::FreshnessRequired),
        }
    }
    ctx.replay.accept(seq)?;
    Ok((plain, binding))
}

/// Protect a CoAP response (§8.3). With `own_piv` the response carries the
/// server's own Partial IV and nonce; otherwise it reuses the request's nonce.
pub fn protect_response(
    ctx: &mut SecurityContext,
    response: &Packet,
    binding: &RequestBinding,
    own_piv: bool,
) -> Result<Packet, OscoreError> {
    let mut buf = encode_plaintext(response)?;
    check_size(ctx, response.payload.len(), buf.len(), 0)?;
    let (option, nonce) = if own_piv {
        let piv = SecurityContext::piv(ctx.take_sequence_number()?);
        let n = nonce(ctx.sender_id(), &piv, ctx.common_iv())?;
        (
            OscoreOption {
                partial_iv: Some(piv),
                ..OscoreOption::default()
            },
            n,
        )
    } else {
        (
            OscoreOption::default(),
            nonce(&binding.kid, &binding.piv, ctx.common_iv())?,
        )
    };
    buf.reserve(ctx.aead().tag_len());
    ctx.seal(
        &nonce,
        &aad(ctx.aead().cose_id(), &binding.kid, &binding.piv),
        &mut buf,
    )?;
    Ok(outer_message(response, false, option.encode()?, buf))
}

/// Verify and decrypt a CoAP response to the request `binding` describes (§8.4).
pub fn unprotect_response(
    ctx: &mut SecurityContext,
    response: &Packet,
    binding: &RequestBinding,
) -> Result<Packet, OscoreError> {
    check_size(ctx, 0, response.payload.len(), ctx.aead().tag_len())?;
    let option = OptionRef::parse(option_value(response)?)?;
    if response.payload.is_empty() {
        return Err(OscoreError::Decode("no ciphertext"));
    }
    let nonce = match option.partial_iv {
        Some(piv) => nonce(ctx.recipient_id(), piv, ctx.common_iv())?,
        None => nonce(&binding.kid, &binding.piv, ctx.common_iv())?,
    };
    let mut buf = response.payload.clone();
    ctx.open(
        &nonce,
        &aad(ctx.aead().cose_id(), &binding.kid, &binding.piv),
        &mut buf,
    )?;
    let plain = decode_plaintext(response, &buf)?;
    check_size(ctx, plain.payload.len(), 0, 0)?;
    Ok(plain)
}

/// The OSCORE-protected 4.01 (Unauthorized) with an Echo challenge that a
/// server whose replay window is uninitialised sends (App. B.1.2, RFC 9175).
/// The response carries the server's own Partial IV: the request may be a replay.
pub fn protect_echo_challenge(
    ctx: &mut SecurityContext,
    request: &Packet,
    echo: Vec<u8>,
) -> Result<Packet, OscoreError> {
    let option = oscore_option(request)?;
    let (Some(piv), Some(kid)) = (option.partial_iv, option.kid) else {
        return Err(OscoreError::Decode("a request needs a kid and a Partial IV"));
    };
    let mut response = Packet::new();
    response.header = request.header.clone();
    response.header.set_type(coap_lite::MessageType::Acknowledgement);
    response.header.code = MessageClass::Response(ResponseType::Unauthorized);
    response.set_token(request.get_token().to_vec());
    response.add_option(CoapOption::Unknown(OPTION_ECHO), echo.clone());
    let protected = protect_response(ctx, &response, &RequestBinding { kid, piv }, true)?;
    ctx.echo_challenge = Some(echo);
    Ok(protected)
}

/// The unprotected error response RFC 8613 §8.2 prescribes for `error`,
/// answering `request` (same token; Max-Age 0; diagnostic payload).
pub fn error_response(request: &Packet, error: &OscoreError) -> Option<Packet> {
    let ((class, detail), diagnostic) = error.coap_error()?;
    let mut response = Packet::new();
    response.header = request.header.clone();
    response.header.set_type(coap_lite::MessageType::Acknowledgement);
    response.header.code = MessageClass::from((class << 5) | detail);
    response.set_token(request.get_token().to_vec());
    response.add_option(CoapOption::MaxAge, Vec::new());
    response.payload = diagnostic.as_bytes().to_vec();
    Some(response)
}
