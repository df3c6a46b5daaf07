//! The AEADs of the ATLS §10 table and HKDF, over RustCrypto.

use aead::generic_array::GenericArray;
use aead::{AeadInPlace, KeyInit};
use aes::{Aes128, Aes256};
use atls_core::{CoseAead, HkdfHash};
use ccm::consts::{U13, U16, U8};
use ccm::Ccm;

use crate::error::OscoreError;

type AesCcm16_64_128 = Ccm<Aes128, U8, U13>;
type AesCcm16_64_256 = Ccm<Aes256, U8, U13>;
type AesCcm16_128_128 = Ccm<Aes128, U16, U13>;
type AesCcm16_128_256 = Ccm<Aes256, U16, U13>;

/// An AEAD with its key schedule computed once.
pub(crate) enum AeadKey {
    Ccm64_128(Box<AesCcm16_64_128>),
    Ccm64_256(Box<AesCcm16_64_256>),
    Ccm128_128(Box<AesCcm16_128_128>),
    Ccm128_256(Box<AesCcm16_128_256>),
    Gcm128(Box<aes_gcm::Aes128Gcm>),
    Gcm256(Box<aes_gcm::Aes256Gcm>),
    ChaCha(Box<chacha20poly1305::ChaCha20Poly1305>),
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(<redacted>)")
    }
}

fn bad_key(_: impl std::fmt::Debug) -> OscoreError {
    OscoreError::Unsupported("key length does not fit the algorithm".into())
}

impl AeadKey {
    pub(crate) fn new(alg: CoseAead, key: &[u8]) -> Result<Self, OscoreError> {
        if key.len() != alg.key_len() {
            return Err(bad_key(()));
        }
        Ok(match alg {
            CoseAead::AesCcm16_64_128 => {
                Self::Ccm64_128(Box::new(AesCcm16_64_128::new_from_slice(key).map_err(bad_key)?))
            }
            CoseAead::AesCcm16_64_256 => {
                Self::Ccm64_256(Box::new(AesCcm16_64_256::new_from_slice(key).map_err(bad_key)?))
            }
            CoseAead::AesCcm16_128_128 => {
                Self::Ccm128_128(Box::new(AesCcm16_128_128::new_from_slice(key).map_err(bad_key)?))
            }
            CoseAead::AesCcm16_128_256 => {
                Self::Ccm128_256(Box::new(AesCcm16_128_256::new_from_slice(key).map_err(bad_key)?))
            }
            CoseAead::A128Gcm => Self::Gcm128(Box::new(
                aes_gcm::Aes128Gcm::new_from_slice(key).map_err(bad_key)?,
            )),
            CoseAead::A256Gcm => Self::Gcm256(Box::new(
                aes_gcm::Aes256Gcm::new_from_slice(key).map_err(bad_key)?,
            )),
            CoseAead::ChaCha20Poly1305 => Self::ChaCha(Box::new(
                chacha20poly1305::ChaCha20Poly1305::new_from_slice(key).map_err(bad_key)?,
            )),
            _ => return Err(OscoreError::Unsupported(format!("{alg:?}"))),
        })
    }

    fn nonce_len(&self) -> usize {
        match self {
            Self::Ccm64_128(_) | Self::Ccm64_256(_) | Self::Ccm128_128(_) | Self::Ccm128_256(_) => 13,
            _ => 12,
        }
    }

    /// Encrypt `buffer` in place and append the tag.
    pub(crate) fn seal(&self, nonce: &[u8], aad: &[u8], buffer: &mut Vec<u8>) -> Result<(), OscoreError> {
        if nonce.len() != self.nonce_len() {
            return Err(OscoreError::Decode("nonce length does not fit the algorithm"));
        }
        let fail = |_| OscoreError::Coap("encryption failed".into());
        match self {
            Self::Ccm64_128(c) => c
                .encrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Ccm64_256(c) => c
                .encrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Ccm128_128(c) => c
                .encrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Ccm128_256(c) => c
                .encrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Gcm128(c) => c
                .encrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Gcm256(c) => c
                .encrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::ChaCha(c) => c
                .encrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
        }
    }

    /// Verify and decrypt `buffer` (ciphertext || tag) in place.
    pub(crate) fn open(&self, nonce: &[u8], aad: &[u8], buffer: &mut Vec<u8>) -> Result<(), OscoreError> {
        if nonce.len() != self.nonce_len() {
            return Err(OscoreError::Decode("nonce length does not fit the algorithm"));
        }
        let fail = |_| OscoreError::Decryption;
        match self {
            Self::Ccm64_128(c) => c
                .decrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Ccm64_256(c) => c
                .decrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Ccm128_128(c) => c
                .decrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Ccm128_256(c) => c
                .decrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Gcm128(c) => c
                .decrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::Gcm256(c) => c
                .decrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
            Self::ChaCha(c) => c
                .decrypt_in_place(GenericArray::from_slice(nonce), aad, buffer)
                .map_err(fail),
        }
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
