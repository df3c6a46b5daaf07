//! The OSCORE security context (RFC 8613 §3): derivation, nonces, the AAD,
//! sender sequence numbers and the replay window.

use std::fmt;
use std::sync::Arc;

use atls_core::{AtlsKeys, CoseAead, HkdfHash, ProtectionIds};
use ciborium::Value;
use zeroize::Zeroizing;

use crate::crypto::{hkdf, AeadKey};
use crate::error::OscoreError;
use crate::message::MAX_MESSAGE;
use crate::option::{piv_from_seq, seq_from_piv};
use crate::store::SequenceStore;

/// Sequence numbers stop below 2^40 (§7.2.1).
pub const MAX_SEQ: u64 = (1 << 40) - 1;
/// Default replay window size (§3.2.2).
pub const DEFAULT_REPLAY_WINDOW: u32 = 32;
/// Default persistence interval K of Appendix B.1.1.
pub const DEFAULT_PERSIST_INTERVAL: u64 = 64;

/// Inputs of a security context.
#[derive(Clone)]
pub struct ContextParams {
    /// Master Secret.
    pub master_secret: Zeroizing<Vec<u8>>,
    /// Master Salt (may be empty).
    pub master_salt: Zeroizing<Vec<u8>>,
    /// AEAD algorithm.
    pub aead: CoseAead,
    /// HKDF hash.
    pub hkdf: HkdfHash,
    /// Sender ID.
    pub sender_id: Vec<u8>,
    /// Recipient ID.
    pub recipient_id: Vec<u8>,
    /// ID Context, if any.
    pub id_context: Option<Vec<u8>>,
    /// Replay window size (1..=64).
    pub replay_window: u32,
}

impl fmt::Debug for ContextParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextParams")
            .field("aead", &self.aead)
            .field("hkdf", &self.hkdf)
            .field("sender_id", &hex(&self.sender_id))
            .field("recipient_id", &hex(&self.recipient_id))
            .field("id_context", &self.id_context.as_deref().map(hex))
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ContextParams {
    /// The context an ATLS session yields (draft §9.1): Master Secret and Salt
    /// from the `atls-oscore` export, algorithms from §10, IDs from the
    /// `oscore_connection_id` extension or the fallback.
    pub fn from_atls(keys: &AtlsKeys, ids: &ProtectionIds) -> Self {
        Self {
            master_secret: Zeroizing::new(keys.master_secret.dangerous_as_bytes().to_vec()),
            master_salt: Zeroizing::new(keys.master_salt.dangerous_as_bytes().to_vec()),
            aead: keys.algorithms.aead,
            hkdf: keys.algorithms.hkdf,
            sender_id: ids.sender_id.clone(),
            recipient_id: ids.recipient_id.clone(),
            id_context: None,
            replay_window: DEFAULT_REPLAY_WINDOW,
        }
    }
}

/// The sliding replay window of a Recipient Context (§7.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayWindow {
    /// After a restart: nothing is accepted until freshness is proven with Echo (App. B.1.2).
    Uninitialized,
    /// Highest sequence number accepted and the bitmap of the ones below it.
    Active {
        /// Window size.
        size: u32,
        /// Highest accepted sequence number.
        top: u64,
        /// Bit i set: `top - i` was accepted (bit 0 is `top`).
        seen: u64,
        /// Whether anything was accepted yet.
        any: bool,
    },
}

impl ReplayWindow {
    /// A fresh window that accepts everything not yet seen.
    pub fn new(size: u32) -> Self {
        Self::Active {
            size: size.clamp(1, 64),
            top: 0,
            seen: 0,
            any: false,
        }
    }

    /// A window whose lower limit is `seq` (App. B.1.2): `seq` and everything
    /// below it count as seen.
    pub fn starting_at(size: u32, seq: u64) -> Self {
        Self::Active {
            size: size.clamp(1, 64),
            top: seq,
            seen: u64::MAX,
            any: true,
        }
    }

    /// Whether `seq` would be accepted.
    pub fn check(&self, seq: u64) -> Result<(), OscoreError> {
        match *self {
            Self::Uninitialized => Err(OscoreError::FreshnessRequired),
            Self::Active { size, top, seen, any } => {
                if !any || seq > top {
                    return Ok(());
                }
                let behind = top - seq;
                if behind >= u64::from(size) || seen & (1u64 << behind) != 0 {
                    return Err(OscoreError::Replay);
                }
                Ok(())
            }
        }
    }

    /// Record `seq` as accepted (after successful decryption).
    pub fn accept(&mut self, seq: u64) -> Result<(), OscoreError> {
        self.check(seq)?;
        if let Self::Active { top, seen, any, .. } = self {
            if !*any {
                *top = seq;
                *seen = 1;
                *any = true;
            } else if seq > *top {
                let shift = seq - *top;
                *seen = if shift >= 64 { 0 } else { *seen << shift };
                *seen |= 1;
                *top = seq;
            } else {
                *seen |= 1u64 << (*top - seq);
            }
        }
        Ok(())
    }
}

/// Sender sequence numbers, persisted ahead of use (Appendix B.1.1).
struct SenderSeq {
    next: u64,
    store: Option<(Arc<dyn SequenceStore>, Vec<u8>)>,
    interval: u64,
}

/// A complete OSCORE security context: common, sender and recipient parts.
pub struct SecurityContext {
    aead: CoseAead,
    common_iv: Vec<u8>,
    id_context: Option<Vec<u8>>,
    sender_id: Vec<u8>,
    sender_key: AeadKey,
    recipient_id: Vec<u8>,
    recipient_key: AeadKey,
    seq: SenderSeq,
    /// The replay window of the recipient.
    pub replay: ReplayWindow,
    /// Pending Echo challenge issued to the peer (App. B.1.2).
    pub(crate) echo_challenge: Option<Vec<u8>>,
    pub(crate) window_size: u32,
    /// Largest payload protected or accepted (default [`MAX_MESSAGE`]).
    max_message: usize,
}

impl fmt::Debug for SecurityContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityContext")
            .field("aead", &self.aead)
            .field("sender_id", &hex(&self.sender_id))
            .field("recipient_id", &hex(&self.recipient_id))
            .field("next_seq", &self.seq.next)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

/// CBOR `info` of §3.2.1: [id, id_context, alg_aead, type, L].
pub(crate) fn info(id: &[u8], id_context: Option<&[u8]>, alg: i64, kind: &str, len: usize) -> Vec<u8> {
    let value = Value::Array(vec![
        Value::Bytes(id.to_vec()),
        id_context.map_or(Value::Null, |c| Value::Bytes(c.to_vec())),
        Value::Integer(alg.into()),
        Value::Text(kind.to_owned()),
        Value::Integer((len as u64).into()),
    ]);
    cbor(&value)
}

/// The `info` structure, exposed for the RFC test vectors.
#[doc(hidden)]
pub fn info_for_tests(id: &[u8], id_context: Option<&[u8]>, alg: i64, kind: &str, len: usize) -> Vec<u8> {
    info(id, id_context, alg, kind, len)
}

pub(crate) fn cbor(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = ciborium::into_writer(value, &mut out);
    out
}

/// Derived key material, exposed for test vectors.
#[derive(Clone, PartialEq, Eq)]
pub struct DerivedKeys {
    /// Sender Key.
    pub sender_key: Zeroizing<Vec<u8>>,
    /// Recipient Key.
    pub recipient_key: Zeroizing<Vec<u8>>,
    /// Common IV.
    pub common_iv: Vec<u8>,
}

impl fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivedKeys(<redacted>)")
    }
}

/// Derive Sender Key, Recipient Key and Common IV (§3.2.1).
pub fn derive_keys(p: &ContextParams) -> Result<DerivedKeys, OscoreError> {
    let alg = p.aead.cose_id();
    let key_len = p.aead.key_len();
    let ctx = p.id_context.as_deref();
    let derive = |id: &[u8], kind: &str, len: usize| {
        hkdf(
            p.hkdf,
            &p.master_salt,
            &p.master_secret,
            &info(id, ctx, alg, kind, len),
            len,
        )
    };
    Ok(DerivedKeys {
        sender_key: Zeroizing::new(derive(&p.sender_id, "Key", key_len)?),
        recipient_key: Zeroizing::new(derive(&p.recipient_id, "Key", key_len)?),
        common_iv: derive(&[], "IV", p.aead.nonce_len())?,
    })
}

/// An AEAD nonce: 12 or 13 bytes, on the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nonce {
    bytes: [u8; 13],
    len: usize,
}

impl std::ops::Deref for Nonce {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl AsRef<[u8]> for Nonce {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// The AEAD nonce of §5.2 from an ID, a Partial IV and the Common IV.
pub fn nonce(id: &[u8], piv: &[u8], common_iv: &[u8]) -> Result<Nonce, OscoreError> {
    let n = common_iv.len();
    if !(12..=13).contains(&n) {
        return Err(OscoreError::Unsupported("nonce length".into()));
    }
    let id_space = n - 6;
    if id.len() > id_space || piv.len() > 5 {
        return Err(OscoreError::Decode("ID or Partial IV too long for the nonce"));
    }
    let mut out = [0u8; 13];
    out[0] = id.len() as u8;
    out[1 + id_space - id.len()..1 + id_space].copy_from_slice(id);
    out[n - piv.len()..n].copy_from_slice(piv);
    for (o, iv) in out.iter_mut().zip(common_iv) {
        *o ^= iv;
    }
    Ok(Nonce { bytes: out, len: n })
}

/// CBOR head of major type `major` with argument `value` (RFC 8949 §3).
fn cbor_head(out: &mut Vec<u8>, major: u8, value: u64) {
    let m = major << 5;
    match value {
        0..=23 => out.push(m | value as u8),
        24..=0xFF => out.extend_from_slice(&[m | 24, value as u8]),
        0x100..=0xFFFF => {
            out.push(m | 25);
            out.extend_from_slice(&(value as u16).to_be_bytes());
        }
        _ => {
            out.push(m | 26);
            out.extend_from_slice(&(value as u32).to_be_bytes());
        }
    }
}

fn cbor_int(out: &mut Vec<u8>, value: i64) {
    if value >= 0 {
        cbor_head(out, 0, value.unsigned_abs());
    } else {
        cbor_head(out, 1, value.unsigned_abs() - 1);
    }
}

fn cbor_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    cbor_head(out, 2, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Length of a CBOR head for argument `value`.
fn cbor_head_len(value: usize) -> usize {
    match value {
        0..=23 => 1,
        24..=0xFF => 2,
        0x100..=0xFFFF => 3,
        _ => 5,
    }
}

/// The AAD of §5.4: Enc_structure ["Encrypt0", h'', external_aad] with
/// `external_aad = bstr .cbor [1, [alg], request_kid, request_piv, I options]`.
/// Encoded directly into one buffer: it is on every message's path.
pub fn aad(alg: i64, request_kid: &[u8], request_piv: &[u8]) -> Vec<u8> {
    let alg_len = cbor_head_len(usize::try_from(if alg < 0 { -1 - alg } else { alg }).unwrap_or(usize::MAX));
    let array_len = 3
        + alg_len
        + cbor_head_len(request_kid.len())
        + request_kid.len()
        + cbor_head_len(request_piv.len())
        + request_piv.len()
        + 1;
    let mut out = Vec::with_capacity(11 + cbor_head_len(array_len) + array_len);
    out.extend_from_slice(b"\x83\x68Encrypt0\x40");
    cbor_head(&mut out, 2, array_len as u64);
    out.extend_from_slice(&[0x85, 0x01, 0x81]);
    cbor_int(&mut out, alg);
    cbor_bytes(&mut out, request_kid);
    cbor_bytes(&mut out, request_piv);
    out.push(0x40);
    out
}

impl SecurityContext {
    /// Derive a context that keeps its sequence numbers in memory only: after
    /// a restart it would reuse nonces with the same keys. Only for contexts
    /// that never outlive the process (a client whose ATLS session is redone
    /// on restart, tests); servers use [`SecurityContext::with_store`].
    pub fn new_in_memory(params: &ContextParams) -> Result<Self, OscoreError> {
        Self::build(params, None, DEFAULT_PERSIST_INTERVAL, 0)
    }

    /// Derive a context whose sender sequence numbers are persisted in
    /// `store` every `interval` numbers (App. B.1.1). A context found in the
    /// store starts at the stored value + `interval` and, having lost its
    /// replay state, requires Echo (App. B.1.2) before accepting requests.
    pub fn with_store(
        params: &ContextParams,
        store: Arc<dyn SequenceStore>,
        interval: u64,
    ) -> Result<Self, OscoreError> {
        // Refuse invalid parameters before the store records the context.
        check_params(params)?;
        let key = store_key(params);
        let (start, restarted) = match store.load(&key)? {
            Some(stored) => (stored.saturating_add(interval), true),
            None => {
                // Record the context at once, even if it never sends with its
                // own Partial IV: a restart must find it and distrust its
                // (lost) replay window.
                store.persist(&key, 0)?;
                (0, false)
            }
        };
        let mut ctx = Self::build(params, Some((store, key)), interval.max(1), start)?;
        if restarted {
            ctx.replay = ReplayWindow::Uninitialized;
        }
        Ok(ctx)
    }

    fn build(
        p: &ContextParams,
        store: Option<(Arc<dyn SequenceStore>, Vec<u8>)>,
        interval: u64,
        start: u64,
    ) -> Result<Self, OscoreError> {
        check_params(p)?;
        let keys = derive_keys(p)?;
        Ok(Self {
            aead: p.aead,
            sender_key: AeadKey::new(p.aead, &keys.sender_key)?,
            recipient_key: AeadKey::new(p.aead, &keys.recipient_key)?,
            common_iv: keys.common_iv,
            id_context: p.id_context.clone(),
            sender_id: p.sender_id.clone(),
            recipient_id: p.recipient_id.clone(),
            seq: SenderSeq {
                next: start,
                store,
                interval,
            },
            replay: ReplayWindow::new(p.replay_window),
            echo_challenge: None,
            window_size: p.replay_window,
            max_message: MAX_MESSAGE,
        })
    }

    /// Largest payload, in bytes, this context protects or accepts: the
    /// payload of the inner CoAP message (OSCORE) or the plaintext (COSE
    /// profile). [`MAX_MESSAGE`] unless changed with
    /// [`SecurityContext::set_max_message`].
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Set the largest payload this context protects or accepts. Larger
    /// payloads are refused with [`OscoreError::Decode`], before decryption
    /// when the ciphertext's length already shows it. (The COSE parser's
    /// own sanity bound, [`crate::cose::MAX_COSE_MESSAGE`], is far above.)
    pub fn set_max_message(&mut self, bytes: usize) {
        self.max_message = bytes;
    }

    /// The AEAD algorithm.
    pub fn aead(&self) -> CoseAead {
        self.aead
    }

    /// Sender ID (the kid this side sends).
    pub fn sender_id(&self) -> &[u8] {
        &self.sender_id
    }

    /// Recipient ID (the kid the peer sends).
    pub fn recipient_id(&self) -> &[u8] {
        &self.recipient_id
    }

    /// ID Context.
    pub fn id_context(&self) -> Option<&[u8]> {
        self.id_context.as_deref()
    }

    /// The next sender sequence number that will be used.
    pub fn next_sequence_number(&self) -> u64 {
        self.seq.next
    }

    /// Take the next sender sequence number, persisting ahead when due.
    pub(crate) fn take_sequence_number(&mut self) -> Result<u64, OscoreError> {
        let seq = self.seq.next;
        if seq > MAX_SEQ {
            return Err(OscoreError::SequenceExhausted);
        }
        if let Some((store, key)) = &self.seq.store {
            if seq % self.seq.interval == 0 {
                // Before a number divisible by K is used, it is stored durably.
                store.persist(key, seq)?;
            }
        }
        self.seq.next = seq + 1;
        Ok(seq)
    }

    pub(crate) fn seal(&self, nonce: &[u8], aad: &[u8], buf: &mut Vec<u8>) -> Result<(), OscoreError> {
        self.sender_key.seal(nonce, aad, buf)
    }

    pub(crate) fn open(&self, nonce: &[u8], aad: &[u8], buf: &mut Vec<u8>) -> Result<(), OscoreError> {
        self.recipient_key.open(nonce, aad, buf)
    }

    pub(crate) fn common_iv(&self) -> &[u8] {
        &self.common_iv
    }

    /// Sequence number in a received Partial IV, checked against the window.
    pub(crate) fn check_replay(&self, piv: &[u8]) -> Result<u64, OscoreError> {
        let seq = seq_from_piv(piv)?;
        self.replay.check(seq)?;
        Ok(seq)
    }

    /// Build the Partial IV for `seq`.
    pub(crate) fn piv(seq: u64) -> Vec<u8> {
        piv_from_seq(seq)
    }
}

/// Parameters that cannot form a context (RFC 8613 §3.3).
fn check_params(p: &ContextParams) -> Result<(), OscoreError> {
    if p.sender_id.len() > p.aead.nonce_len() - 6 || p.recipient_id.len() > p.aead.nonce_len() - 6 {
        return Err(OscoreError::Unsupported(
            "Sender/Recipient ID longer than nonce length - 6".into(),
        ));
    }
    if p.sender_id == p.recipient_id {
        // §3.3: the Sender ID of one endpoint must differ from its Recipient
        // ID, or both directions would share key and nonces.
        return Err(OscoreError::InvalidContext("Sender ID equals Recipient ID"));
    }
    Ok(())
}

/// The store key of a context: a hash of what identifies it, never the secret itself.
fn store_key(p: &ContextParams) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"atls-oscore-seq\0");
    for part in [
        &p.master_secret[..],
        &p.master_salt[..],
        &p.sender_id,
        p.id_context.as_deref().unwrap_or(b"\xff"),
    ] {
        h.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        h.update(part);
    }
    h.finalize()[..16].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_accepts_new_rejects_replays_and_old() {
        let mut w = ReplayWindow::new(32);
        w.accept(5).expect("first");
        assert_eq!(w.check(5), Err(OscoreError::Replay));
        w.accept(3).expect("older, unseen");
        assert_eq!(w.accept(3), Err(OscoreError::Replay));
        w.accept(100).expect("jump ahead");
        assert_eq!(
            w.check(68),
            Err(OscoreError::Replay),
            "100 - 68 = 32 is outside a window of 32"
        );
        w.accept(69).expect("inside the window");
        assert_eq!(w.check(69), Err(OscoreError::Replay));
        assert!(w.check(101).is_ok());
        w.accept(0xFF_FFFF_FFFF).expect("max");
        assert_eq!(w.check(100), Err(OscoreError::Replay));
    }

    #[test]
    fn sender_id_equal_to_recipient_id_is_refused() {
        let p = ContextParams {
            master_secret: Zeroizing::new(vec![0x11; 16]),
            master_salt: Zeroizing::new(Vec::new()),
            aead: CoseAead::AesCcm16_64_128,
            hkdf: HkdfHash::Sha256,
            sender_id: vec![0x01],
            recipient_id: vec![0x01],
            id_context: None,
            replay_window: DEFAULT_REPLAY_WINDOW,
        };
        let refused = OscoreError::InvalidContext("Sender ID equals Recipient ID");
        assert_eq!(
            SecurityContext::new_in_memory(&p).map(|_| ()),
            Err(refused.clone())
        );
        let store = Arc::new(crate::store::MemoryStore::default());
        assert_eq!(
            SecurityContext::with_store(&p, store.clone(), DEFAULT_PERSIST_INTERVAL).map(|_| ()),
            Err(refused.clone())
        );
        assert_eq!(
            store.load(&store_key(&p)),
            Ok(None),
            "a refused context is not recorded"
        );
        let empty = ContextParams {
            sender_id: Vec::new(),
            recipient_id: Vec::new(),
            ..p.clone()
        };
        assert_eq!(SecurityContext::new_in_memory(&empty).map(|_| ()), Err(refused));
        let distinct = ContextParams {
            recipient_id: Vec::new(),
            ..p
        };
        assert!(SecurityContext::new_in_memory(&distinct).is_ok());
    }

    #[test]
    fn uninitialized_window_demands_freshness() {
        let w = ReplayWindow::Uninitialized;
        assert_eq!(w.check(0), Err(OscoreError::FreshnessRequired));
    }
}
