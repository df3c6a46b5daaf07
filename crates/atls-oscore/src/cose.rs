//! COSE_Encrypt0 (RFC 9052 §5.2): a low-level layer, and the ATLS COSE
//! profile keyed from the `atls-cose` export (draft §9.2; specified in
//! docs/PROTOCOL.md).
//!
//! The profile derives keys exactly as OSCORE does (a [`SecurityContext`]
//! from the `atls-cose` export and the `cose_ext` kids), and sends
//!
//! - protected header `{1: alg}`;
//! - unprotected header `{4: kid, 6: Partial IV}` on requests and `{6: Partial
//!   IV}` on responses (an empty kid is sent by omitting label 4);
//! - external AAD of a request: the CBOR array `[kid, piv, method, target]`
//!   (bstr, bstr, tstr, tstr) of the request's own kid and Partial IV, its
//!   HTTP method and its target in origin form ([`RequestLine`]), so that
//!   neither can be changed in transit;
//! - external AAD of a response: the CBOR array `[request_kid, request_piv,
//!   status]` (bstr, bstr, uint), which binds every response to its request
//!   and to its HTTP status;
//! - the nonce of RFC 8613 §5.2 from the sender's ID and the Partial IV (every
//!   response carries its own Partial IV);
//! - untagged COSE_Encrypt0 (the media type says what it is; tag 16 is accepted).
//!
//! A request is checked for its kid and against the replay window, then
//! decrypted, and only then accepted into the window: a message that fails
//! to verify never moves it. Plaintexts are bounded by the context's
//! [`SecurityContext::max_message`].

use coset::{
    iana, CborSerializable, CoseEncrypt0, CoseEncrypt0Builder, Header, HeaderBuilder, TaggedCborSerializable,
};

use atls_core::CoseAead;
use ciborium::Value;

use crate::context::{cbor, nonce, SecurityContext};
use crate::crypto::AeadKey;
use crate::error::OscoreError;
use crate::message::RequestBinding;
use crate::option::seq_from_piv;

/// Largest COSE message the parser accepts: a sanity bound far above any
/// context's [`SecurityContext::max_message`], which is the limit that
/// applies (callers also bound what they read).
pub const MAX_COSE_MESSAGE: usize = 64 * 1024 * 1024;

fn cose_error(_: coset::CoseError) -> OscoreError {
    OscoreError::Decode("malformed COSE_Encrypt0")
}

/// Parse a COSE_Encrypt0, tagged (16) or untagged.
pub fn parse_encrypt0(bytes: &[u8]) -> Result<CoseEncrypt0, OscoreError> {
    if bytes.len() > MAX_COSE_MESSAGE {
        return Err(OscoreError::Decode("COSE message too large"));
    }
    if bytes.first().is_some_and(|b| b >> 5 == 6) {
        CoseEncrypt0::from_tagged_slice(bytes).map_err(cose_error)
    } else {
        CoseEncrypt0::from_slice(bytes).map_err(cose_error)
    }
}

/// The AEAD named in a COSE_Encrypt0's headers (protected first).
pub fn message_algorithm(message: &CoseEncrypt0) -> Result<CoseAead, OscoreError> {
    let alg = message
        .protected
        .header
        .alg
        .as_ref()
        .or(message.unprotected.alg.as_ref())
        .ok_or(OscoreError::Decode("no algorithm in the COSE headers"))?;
    match alg {
        coset::Algorithm::Assigned(a) => CoseAead::from_cose_id(*a as i64)
            .ok_or_else(|| OscoreError::Unsupported(format!("COSE algorithm {a:?}"))),
        other => Err(OscoreError::Unsupported(format!("COSE algorithm {other:?}"))),
    }
}

/// RFC 8152 §5.3: with no protected attributes the Enc_structure carries a
/// zero-length bstr, however the sender encoded the empty map (`h'a0'`).
fn normalized(message: &CoseEncrypt0) -> std::borrow::Cow<'_, CoseEncrypt0> {
    if message.protected.header.is_empty()
        && message
            .protected
            .original_data
            .as_ref()
            .is_some_and(|d| !d.is_empty())
    {
        let mut m = message.clone();
        m.protected.original_data = None;
        std::borrow::Cow::Owned(m)
    } else {
        std::borrow::Cow::Borrowed(message)
    }
}

/// Decrypt a COSE_Encrypt0 with a raw key and explicit nonce.
pub fn decrypt0(
    message: &CoseEncrypt0,
    key: &[u8],
    nonce: &[u8],
    external_aad: &[u8],
) -> Result<Vec<u8>, OscoreError> {
    let aead = AeadKey::new(message_algorithm(message)?, key)?;
    normalized(message).decrypt_ciphertext(
        external_aad,
        || OscoreError::Decode("no ciphertext"),
        |ct, aad| {
            let mut buf = ct.to_vec();
            aead.open(nonce, aad, &mut buf).map(|()| buf)
        },
    )
}

/// Encrypt into a COSE_Encrypt0 with a raw key and explicit nonce.
pub fn encrypt0(
    alg: CoseAead,
    key: &[u8],
    protected: Header,
    unprotected: Header,
    nonce: &[u8],
    external_aad: &[u8],
    plaintext: &[u8],
) -> Result<CoseEncrypt0, OscoreError> {
    let aead = AeadKey::new(alg, key)?;
    CoseEncrypt0Builder::new()
        .protected(protected)
        .unprotected(unprotected)
        .try_create_ciphertext(plaintext, external_aad, |pt, aad| {
            let mut buf = pt.to_vec();
            aead.seal(nonce, aad, &mut buf).map(|()| buf)
        })
        .map(CoseEncrypt0Builder::build)
}

fn iana_alg(alg: CoseAead) -> Result<iana::Algorithm, OscoreError> {
    Ok(match alg.cose_id() {
        10 => iana::Algorithm::AES_CCM_16_64_128,
        11 => iana::Algorithm::AES_CCM_16_64_256,
        30 => iana::Algorithm::AES_CCM_16_128_128,
        31 => iana::Algorithm::AES_CCM_16_128_256,
        1 => iana::Algorithm::A128GCM,
        3 => iana::Algorithm::A256GCM,
        24 => iana::Algorithm::ChaCha20Poly1305,
        _ => return Err(OscoreError::Unsupported(format!("{alg:?}"))),
    })
}

/// What a COSE-mode request binds besides its body: the HTTP method and the
/// request target (origin form: path and query, as the server receives it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    /// The HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// The request target in origin form, e.g. `/sensors?id=3`.
    pub target: &'a str,
}

/// What the external AAD of a message binds, besides its request's kid and
/// Partial IV.
#[derive(Clone, Copy)]
enum Bound<'a> {
    /// A request: its method and target.
    Request(&'a RequestLine<'a>),
    /// A response: its status.
    Response(u16),
}

/// External AAD: `[kid, piv, method, target]` for a request (its own kid and
/// Partial IV), `[request_kid, request_piv, status]` for a response.
fn external_aad(binding: &RequestBinding, bound: Bound<'_>) -> Vec<u8> {
    let mut items = vec![
        Value::Bytes(binding.kid.clone()),
        Value::Bytes(binding.piv.clone()),
    ];
    match bound {
        Bound::Request(line) => {
            items.push(Value::Text(line.method.to_owned()));
            items.push(Value::Text(line.target.to_owned()));
        }
        Bound::Response(status) => items.push(Value::Integer(u64::from(status).into())),
    }
    cbor(&Value::Array(items))
}

const TOO_LARGE: OscoreError = OscoreError::Decode("message too large");

/// Seal `plaintext`; a response passes the `request` it answers.
fn seal(
    ctx: &mut SecurityContext,
    bound: Bound<'_>,
    request: Option<&RequestBinding>,
    plaintext: &[u8],
) -> Result<(Vec<u8>, RequestBinding), OscoreError> {
    if plaintext.len() > ctx.max_message() {
        return Err(TOO_LARGE);
    }
    let seq = ctx.take_sequence_number()?;
    let piv = SecurityContext::piv(seq);
    let own = RequestBinding {
        kid: ctx.sender_id().to_vec(),
        piv: piv.clone(),
    };
    let nonce = nonce(ctx.sender_id(), &piv, ctx.common_iv())?;
    let protected = HeaderBuilder::new().algorithm(iana_alg(ctx.aead())?).build();
    let mut unprotected = HeaderBuilder::new().partial_iv(piv);
    if request.is_none() {
        unprotected = unprotected.key_id(own.kid.clone());
    }
    let aad = external_aad(request.unwrap_or(&own), bound);
    let message = CoseEncrypt0Builder::new()
        .protected(protected)
        .unprotected(unprotected.build())
        .try_create_ciphertext(plaintext, &aad, |pt, enc_aad| {
            let mut buf = pt.to_vec();
            ctx.seal(&nonce, enc_aad, &mut buf).map(|()| buf)
        })?
        .build();
    Ok((message.to_vec().map_err(cose_error)?, own))
}

/// The kid of a profile request (absent means h''), for finding its context.
pub fn request_kid(bytes: &[u8]) -> Result<Vec<u8>, OscoreError> {
    Ok(parse_encrypt0(bytes)?.unprotected.key_id)
}

/// Protect a request body, bound to its method and target; returns the
/// COSE_Encrypt0 and the binding its response is verified against.
pub fn seal_request(
    ctx: &mut SecurityContext,
    line: &RequestLine<'_>,
    plaintext: &[u8],
) -> Result<(Vec<u8>, RequestBinding), OscoreError> {
    seal(ctx, Bound::Request(line), None, plaintext)
}

/// Protect a response body with HTTP status `status`, bound to `request`.
pub fn seal_response(
    ctx: &mut SecurityContext,
    status: u16,
    plaintext: &[u8],
    request: &RequestBinding,
) -> Result<Vec<u8>, OscoreError> {
    seal(ctx, Bound::Response(status), Some(request), plaintext).map(|(bytes, _)| bytes)
}

/// Verify and decrypt; a response passes the `request` it answers.
fn open(
    ctx: &mut SecurityContext,
    bound: Bound<'_>,
    bytes: &[u8],
    request: Option<&RequestBinding>,
) -> Result<(Vec<u8>, RequestBinding), OscoreError> {
    let message = parse_encrypt0(bytes)?;
    if message_algorithm(&message)? != ctx.aead() {
        return Err(OscoreError::Decode("algorithm differs from the context's"));
    }
    let ciphertext_len = message.ciphertext.as_ref().map_or(0, Vec::len);
    if ciphertext_len.saturating_sub(ctx.aead().tag_len()) > ctx.max_message() {
        return Err(TOO_LARGE);
    }
    let piv = message.unprotected.partial_iv.clone();
    let seq = seq_from_piv(&piv)?;
    let binding = RequestBinding {
        kid: message.unprotected.key_id.clone(),
        piv: piv.clone(),
    };
    if request.is_none() {
        if binding.kid != ctx.recipient_id() {
            return Err(OscoreError::ContextNotFound);
        }
        ctx.check_replay(&piv)?;
    }
    let aad = external_aad(request.unwrap_or(&binding), bound);
    let nonce = nonce(ctx.recipient_id(), &piv, ctx.common_iv())?;
    let plaintext = message.decrypt_ciphertext(
        &aad,
        || OscoreError::Decode("no ciphertext"),
        |ct, enc_aad| {
            let mut buf = ct.to_vec();
            ctx.open(&nonce, enc_aad, &mut buf).map(|()| buf)
        },
    )?;
    // Only a verified request moves the replay window.
    if request.is_none() {
        ctx.replay.accept(seq)?;
    }
    Ok((plaintext, binding))
}

/// Verify and decrypt a request body received with `line` (its method and
/// target as the server received them); returns the binding for the response.
pub fn open_request(
    ctx: &mut SecurityContext,
    line: &RequestLine<'_>,
    bytes: &[u8],
) -> Result<(Vec<u8>, RequestBinding), OscoreError> {
    open(ctx, Bound::Request(line), bytes, None)
}

/// Verify and decrypt a response body received with HTTP status `status`,
/// answering `request`.
pub fn open_response(
    ctx: &mut SecurityContext,
    status: u16,
    bytes: &[u8],
    request: &RequestBinding,
) -> Result<Vec<u8>, OscoreError> {
    open(ctx, Bound::Response(status), bytes, Some(request)).map(|(plaintext, _)| plaintext)
}

/// Tagged encoding, for interoperating with parsers that expect tag 16.
pub fn to_tagged(message: CoseEncrypt0) -> Result<Vec<u8>, OscoreError> {
    message.to_tagged_vec().map_err(cose_error)
}
