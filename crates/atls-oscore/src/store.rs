//! Durable sender sequence numbers (RFC 8613 Appendix B.1.1).

use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::collections::HashMap;

use redb::{Database, ReadableDatabase, TableDefinition};

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
        Ok(self.values.lock().map_err(|_| OscoreError::Store("poisoned".into()))?.get(context).copied())
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
        txn.commit().map_err(store_error)?;
        Ok(Self { db })
    }
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
