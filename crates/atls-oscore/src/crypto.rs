//! The AEADs of the ATLS §10 table and HKDF, over RustCrypto.

use aead::generic_array::typenum::Unsigned;
use aead::generic_array::GenericArray;
use aead::{AeadInPlace, KeyInit};
use aes::{Aes128, Aes256};
use atls_core::{CoseAead, HkdfHash};
use ccm::consts::{U13, U16, U8};
use ccm::Ccm;

use zeroize::Zeroizing;

use crate::error::OscoreError;

type AesCcm16_64_128 = Ccm<Aes128, U8, U13>;
type AesCcm16_64_256 = Ccm<Aes256, U8, U13>;
type AesCcm16_128_128 = Ccm<Aes128, U16, U13>;
type AesCcm16_128_256 = Ccm<Aes256, U16, U13>;

/// An AEAD key. Only the key bytes are kept (zeroized on drop): the
/// cipher's key schedule is computed for each message: 50–180 ns with
/// AES-NI (docs/BENCHMARKS.md), while a kept schedule costs about 1 KiB per
/// key — four keys per established session, the bulk of a session's memory.
pub(crate) struct AeadKey {
    alg: CoseAead,
    key: Zeroizing<[u8; MAX_KEY]>,
}

const MAX_KEY: usize = 32;

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(<redacted>)")
    }
}

fn bad_key(_: impl std::fmt::Debug) -> OscoreError {
    OscoreError::Unsupported("key length does not fit the algorithm".into())
}

/// Seal or open `buffer` in place with a cipher keyed for this one call.
fn run<A: AeadInPlace + KeyInit>(
    key: &[u8],
    seal: bool,
    nonce: &[u8],
    aad: &[u8],
    buffer: &mut Vec<u8>,
) -> Result<(), OscoreError> {
    if nonce.len() != A::NonceSize::USIZE {
        return Err(OscoreError::Decode("nonce length does not fit the algorithm"));
    }
    let cipher = A::new_from_slice(key).map_err(bad_key)?;
    let nonce = GenericArray::from_slice(nonce);
    if seal {
        cipher
            .encrypt_in_place(nonce, aad, buffer)
            .map_err(|_| OscoreError::Coap("encryption failed".into()))
    } else {
        cipher
            .decrypt_in_place(nonce, aad, buffer)
            .map_err(|_| OscoreError::Decryption)
    }
}

impl AeadKey {
    pub(crate) fn new(alg: CoseAead, key: &[u8]) -> Result<Self, OscoreError> {
        let supported = matches!(
            alg,
            CoseAead::AesCcm16_64_128
                | CoseAead::AesCcm16_64_256
                | CoseAead::AesCcm16_128_128
                | CoseAead::AesCcm16_128_256
                | CoseAead::A128Gcm
                | CoseAead::A256Gcm
                | CoseAead::ChaCha20Poly1305
        );
        if !supported {
            return Err(OscoreError::Unsupported(format!("{alg:?}")));
        }
        if key.len() != alg.key_len() || key.len() > MAX_KEY {
            return Err(bad_key(()));
        }
        let mut bytes = Zeroizing::new([0u8; MAX_KEY]);
        bytes[..key.len()].copy_from_slice(key);
        Ok(Self { alg, key: bytes })
    }

    fn apply(&self, seal: bool, nonce: &[u8], aad: &[u8], buffer: &mut Vec<u8>) -> Result<(), OscoreError> {
        let key = self.key.get(..self.alg.key_len()).ok_or_else(|| bad_key(()))?;
        match self.alg {
            CoseAead::AesCcm16_64_128 => run::<AesCcm16_64_128>(key, seal, nonce, aad, buffer),
            CoseAead::AesCcm16_64_256 => run::<AesCcm16_64_256>(key, seal, nonce, aad, buffer),
            CoseAead::AesCcm16_128_128 => run::<AesCcm16_128_128>(key, seal, nonce, aad, buffer),
            CoseAead::AesCcm16_128_256 => run::<AesCcm16_128_256>(key, seal, nonce, aad, buffer),
            CoseAead::A128Gcm => run::<aes_gcm::Aes128Gcm>(key, seal, nonce, aad, buffer),
            CoseAead::A256Gcm => run::<aes_gcm::Aes256Gcm>(key, seal, nonce, aad, buffer),
            CoseAead::ChaCha20Poly1305 => {
                run::<chacha20poly1305::ChaCha20Poly1305>(key, seal, nonce, aad, buffer)
            }
            _ => Err(OscoreError::Unsupported(format!("{:?}", self.alg))),
        }
    }

    /// Encrypt `buffer` in place and append the tag.
    pub(crate) fn seal(&self, nonce: &[u8], aad: &[u8], buffer: &mut Vec<u8>) -> Result<(), OscoreError> {
        self.apply(true, nonce, aad, buffer)
    }

    /// Verify and decrypt `buffer` (ciphertext || tag) in place.
    pub(crate) fn open(&self, nonce: &[u8], aad: &[u8], buffer: &mut Vec<u8>) -> Result<(), OscoreError> {
        self.apply(false, nonce, aad, buffer)
    }
}

/// HKDF-Extract then Expand (RFC 5869).
pub(crate) fn hkdf(
    hash: HkdfHash,
    salt: &[u8],
    ikm: &[u8],
    info: &[u8],
    len: usize,
) -> Result<Vec<u8>, OscoreError> {
    let mut out = vec![0u8; len];
    let too_long = |_| OscoreError::Unsupported("HKDF output too long".into());
    match hash {
        HkdfHash::Sha256 => hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm)
            .expand(info, &mut out)
            .map_err(too_long)?,
        HkdfHash::Sha384 => hkdf::Hkdf::<sha2::Sha384>::new(Some(salt), ikm)
            .expand(info, &mut out)
            .map_err(too_long)?,
        HkdfHash::Sha512 => hkdf::Hkdf::<sha2::Sha512>::new(Some(salt), ikm)
            .expand(info, &mut out)
            .map_err(too_long)?,
        _ => return Err(OscoreError::Unsupported("HKDF hash".into())),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// Compiles only when the type wipes its key material on drop.
    fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>() {}

    #[test]
    fn key_schedules_are_zeroized_on_drop() {
        // The `zeroize` feature of `aes`: the block cipher of CCM and GCM.
        zeroizes_on_drop::<aes::Aes128>();
        zeroizes_on_drop::<aes::Aes256>();
        zeroizes_on_drop::<chacha20poly1305::ChaCha20Poly1305>();
    }
}
