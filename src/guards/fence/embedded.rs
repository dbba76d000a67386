//! The embedded receipt store: a redb file under `state_dir`, one process owning it. The fence
//! (`super::Fence`) calls it on a blocking thread; `cmd check` opens it to validate the file.

use std::path::Path;

use redb::ReadableTable;

use super::{FenceError, Receipt};

const RECEIPTS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("receipts");

/// Receipts in a redb file; every commit is durable before the waiters hear of it.
pub struct Embedded {
    db: redb::Database,
    path: String,
}

impl Embedded {
    pub fn open(path: &Path) -> Result<Embedded, FenceError> {
        let shown = path.display().to_string();
        let fail = |detail: String| FenceError::Embedded {
            path: shown.clone(),
            detail,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let db = redb::Database::create(path).map_err(|e| fail(e.to_string()))?;
        let store = Embedded {
            db,
            path: shown.clone(),
        };
        // Create the table up front so a read never meets a missing table.
        store.write(|table| {
            let _ = table;
            Ok(())
        })?;
        Ok(store)
    }

    fn fail(&self, e: impl std::fmt::Display) -> FenceError {
        FenceError::Embedded {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<T, FenceError>,
    ) -> Result<T, FenceError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let out = {
            let mut table = tx.open_table(RECEIPTS).map_err(|e| self.fail(e))?;
            f(&mut table)?
        };
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(out)
    }

    /// The live receipt of `key`; an expired one is as none (the purge deletes it later).
    pub fn get(&self, key: &str, now_ms: u64) -> Result<Option<Receipt>, FenceError> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = tx.open_table(RECEIPTS).map_err(|e| self.fail(e))?;
        let Some(value) = table.get(key).map_err(|e| self.fail(e))? else {
            return Ok(None);
        };
        let bytes = value.value();
        if Receipt::expires_of(bytes).is_none_or(|at| at <= now_ms) {
            return Ok(None);
        }
        match Receipt::decode(bytes) {
            Some(r) => Ok(Some(r)),
            None => {
                tracing::error!(
                    key,
                    "unreadable idempotency receipt; treating the key as new"
                );
                Ok(None)
            }
        }
    }

    /// Stores a receipt durably. Returns whether the key already had a live receipt (a duplicate effect).
    pub fn put(&self, key: &str, bytes: &[u8], now_ms: u64) -> Result<bool, FenceError> {
        self.write(|table| {
            let live = table
                .get(key)
                .map_err(|e| self.fail(e))?
                .and_then(|v| Receipt::expires_of(v.value()))
                .is_some_and(|at| at > now_ms);
            table.insert(key, bytes).map_err(|e| self.fail(e))?;
            Ok(live)
        })
    }

    /// Deletes the receipts expired by `now_ms`.
    pub fn purge(&self, now_ms: u64) -> Result<usize, FenceError> {
        self.write(|table| {
            let removed = table
                .extract_if(|_, v| Receipt::expires_of(v).is_none_or(|at| at <= now_ms))
                .map_err(|e| self.fail(e))?
                .count();
            Ok(removed)
        })
    }
}
