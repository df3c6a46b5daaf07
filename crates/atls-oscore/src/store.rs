//! Durable sender sequence numbers (RFC 8613 Appendix B.1.1).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use atls_core::{CoseAead, HkdfHash};
use ciborium::Value;
use redb::{Database, ReadableDatabase, TableDefinition};
use zeroize::Zeroizing;

use crate::context::{cbor, ContextParams};
use crate::error::OscoreError;

/// Where a context keeps the sequence number it may not go below after a restart.
pub trait SequenceStore: Send + Sync + fmt::Debug {
    /// The last persisted value for a context, if any.
    fn load(&self, context: &[u8]) -> Result<Option<u64>, OscoreError>;
    /// Persist `seq` durably before it is used.
    fn persist(&self, context: &[u8], seq: u64) -> Result<(), OscoreError>;
}

/// Sequence numbers in memory only: lost on restart. An explicit choice,
/// never a server default.
#[derive(Debug, Default)]
pub struct MemoryStore {
    values: Mutex<HashMap<Vec<u8>, u64>>,
}

impl SequenceStore for MemoryStore {
    fn load(&self, context: &[u8]) -> Result<Option<u64>, OscoreError> {
        Ok(self
            .values
            .lock()
            .map_err(|_| OscoreError::Store("poisoned".into()))?
            .get(context)
            .copied())
    }

    fn persist(&self, context: &[u8], seq: u64) -> Result<(), OscoreError> {
        self.values
            .lock()
            .map_err(|_| OscoreError::Store("poisoned".into()))?
            .insert(context.to_vec(), seq);
        Ok(())
    }
}

const SEQUENCES: TableDefinition<&[u8], u64> = TableDefinition::new("oscore_sequence_numbers");
const CONTEXTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("established_contexts");

/// Sequence numbers in an embedded redb database, committed durably.
pub struct RedbStore {
    db: Database,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedbStore")
    }
}

fn store_error(e: impl fmt::Display) -> OscoreError {
    OscoreError::Store(e.to_string())
}

impl RedbStore {
    /// Open (or create) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, OscoreError> {
        let db = Database::create(path).map_err(store_error)?;
        let txn = db.begin_write().map_err(store_error)?;
        txn.open_table(SEQUENCES).map_err(store_error)?;
        txn.open_table(CONTEXTS).map_err(store_error)?;
        txn.commit().map_err(store_error)?;
        Ok(Self { db })
    }

    /// Keep an established context's parameters under `name` (for example
    /// the server's CID), so that it survives a restart. The Master Secret is
    /// stored as is: protect the state directory like a private key.
    pub fn save_context(&self, name: &[u8], params: &ContextParams) -> Result<(), OscoreError> {
        let mut encoded = Zeroizing::new(encode_params(params));
        let txn = self.db.begin_write().map_err(store_error)?;
        {
            let mut table = txn.open_table(CONTEXTS).map_err(store_error)?;
            table.insert(name, encoded.as_slice()).map_err(store_error)?;
        }
        txn.commit().map_err(store_error)?;
        zeroize::Zeroize::zeroize(&mut *encoded);
        Ok(())
    }

    /// The context saved under `name`, if any.
    pub fn load_context(&self, name: &[u8]) -> Result<Option<ContextParams>, OscoreError> {
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(CONTEXTS).map_err(store_error)?;
        let Some(value) = table.get(name).map_err(store_error)? else {
            return Ok(None);
        };
        decode_params(value.value()).map(Some)
    }

    /// Forget the context saved under `name`.
    pub fn remove_context(&self, name: &[u8]) -> Result<(), OscoreError> {
        let txn = self.db.begin_write().map_err(store_error)?;
        {
            let mut table = txn.open_table(CONTEXTS).map_err(store_error)?;
            table.remove(name).map_err(store_error)?;
        }
        txn.commit().map_err(store_error)
    }
}

fn hkdf_id(h: HkdfHash) -> i64 {
    match h {
        HkdfHash::Sha256 => 256,
        HkdfHash::Sha384 => 384,
        _ => 512,
    }
}

/// CBOR array: [version 1, secret, salt, alg, hkdf, sender, recipient, id_context / null, window].
fn encode_params(p: &ContextParams) -> Vec<u8> {
    cbor(&Value::Array(vec![
        Value::Integer(1.into()),
        Value::Bytes(p.master_secret.to_vec()),
        Value::Bytes(p.master_salt.to_vec()),
        Value::Integer(p.aead.cose_id().into()),
        Value::Integer(hkdf_id(p.hkdf).into()),
        Value::Bytes(p.sender_id.clone()),
        Value::Bytes(p.recipient_id.clone()),
        p.id_context.clone().map_or(Value::Null, Value::Bytes),
        Value::Integer(p.replay_window.into()),
    ]))
}

fn decode_params(bytes: &[u8]) -> Result<ContextParams, OscoreError> {
    let corrupt = || OscoreError::Store("stored context is corrupt".into());
    let value: Value = ciborium::from_reader(bytes).map_err(|_| corrupt())?;
    let Value::Array(items) = value else {
        return Err(corrupt());
    };
    let bytes_at = |i: usize| match items.get(i) {
        Some(Value::Bytes(b)) => Ok(b.clone()),
        _ => Err(corrupt()),
    };
    let int_at = |i: usize| match items.get(i) {
        Some(Value::Integer(n)) => i64::try_from(*n).map_err(|_| corrupt()),
        _ => Err(corrupt()),
    };
    if int_at(0)? != 1 {
        return Err(OscoreError::Store("stored context has an unknown version".into()));
    }
    Ok(ContextParams {
        master_secret: Zeroizing::new(bytes_at(1)?),
        master_salt: Zeroizing::new(bytes_at(2)?),
        aead: CoseAead::from_cose_id(int_at(3)?).ok_or_else(corrupt)?,
        hkdf: match int_at(4)? {
            256 => HkdfHash::Sha256,
            384 => HkdfHash::Sha384,
            512 => HkdfHash::Sha512,
            _ => return Err(corrupt()),
        },
        sender_id: bytes_at(5)?,
        recipient_id: bytes_at(6)?,
        id_context: match items.get(7) {
            Some(Value::Null) => None,
            Some(Value::Bytes(b)) => Some(b.clone()),
            _ => return Err(corrupt()),
        },
        replay_window: u32::try_from(int_at(8)?).map_err(|_| corrupt())?,
    })
}

impl SequenceStore for RedbStore {
    fn load(&self, context: &[u8]) -> Result<Option<u64>, OscoreError> {
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(SEQUENCES).map_err(store_error)?;
        Ok(table.get(context).map_err(store_error)?.map(|v| v.value()))
    }

    fn persist(&self, context: &[u8], seq: u64) -> Result<(), OscoreError> {
        let txn = self.db.begin_write().map_err(store_error)?;
        {
            let mut table = txn.open_table(SEQUENCES).map_err(store_error)?;
            table.insert(context, seq).map_err(store_error)?;
        }
        txn.commit().map_err(store_error)
    }
}
