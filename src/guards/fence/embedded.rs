//! The embedded receipt store: a redb file under `state_dir`, one process owning it. The fence
//! (`super::Fence`) calls it on a blocking thread; `cmd check` opens it to validate the file.
//!
//! After a failed I/O (a full disk, a write error) redb refuses every later transaction with "Previous
//! I/O error" until the database is closed and opened again; left so, one full-disk moment would turn
//! the fence off until a restart. So any failed operation closes the database here and the next one
//! opens it again (redb repairs an interrupted commit on open): once space is back, so is the store.

use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard};

use redb::ReadableTable;

use super::{FenceError, Receipt};

/// The receipt store's page cache (redb's default is 1 GiB). redb puts every page a commit writes into
/// its read cache until the cap, so the cache fills with the file as new keys arrive and is part of the
/// process's RSS: the cap is what bounds it. Kept small: a lookup that misses it reads a page or two
/// from the OS page cache (measured: lookups as fast with 1 MiB as with 16 MiB), and each commit's
/// fsync costs far more than that.
const RECEIPT_CACHE_BYTES: usize = 2 << 20;

const RECEIPTS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("receipts");

/// Opens (or creates) the database; called again after a failure.
type Opener = Box<dyn Fn() -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

/// Receipts in a redb file; every commit is durable before the waiters hear of it.
pub struct Embedded {
    /// `None` after a failure: closed, to be opened again by the next operation.
    db: RwLock<Option<redb::Database>>,
    open: Opener,
    path: String,
}

impl Embedded {
    pub fn open(path: &Path) -> Result<Embedded, FenceError> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| FenceError::Embedded {
                path: shown.clone(),
                detail: e.to_string(),
            })?;
        }
        let file = path.to_path_buf();
        // redb caches up to 1 GiB of pages by default: a sidecar's memory limit is far below that, and
        // the receipts' working set (recent keys) is small (see RECEIPT_CACHE_BYTES).
        Embedded::with_opener(
            shown,
            Box::new(move || {
                redb::Builder::new()
                    .set_cache_size(RECEIPT_CACHE_BYTES)
                    .create(&file)
            }),
        )
    }

    /// A store whose database `open` makes (a file, or in tests a backend that fails on demand).
    pub(super) fn with_opener(path: String, open: Opener) -> Result<Embedded, FenceError> {
        let store = Embedded {
            db: RwLock::new(None),
            open,
            path,
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

    /// Runs `f` on the open database (opening it first if a failure closed it); a failure closes it.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, FenceError>,
    ) -> Result<T, FenceError> {
        let result = {
            let guard = self.ready()?;
            match guard.as_ref() {
                Some(db) => f(db),
                None => Err(self.fail("the store is being reopened")),
            }
        };
        if result.is_err() {
            *self.db.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
        result
    }

    fn ready(&self) -> Result<RwLockReadGuard<'_, Option<redb::Database>>, FenceError> {
        {
            let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
            if guard.is_some() {
                return Ok(guard);
            }
        }
        {
            let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some((self.open)().map_err(|e| self.fail(e))?);
                tracing::info!(path = %self.path, "idempotency receipt store opened");
            }
        }
        Ok(self.db.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<T, FenceError>,
    ) -> Result<T, FenceError> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.fail(e))?;
            let out = {
                let mut table = tx.open_table(RECEIPTS).map_err(|e| self.fail(e))?;
                f(&mut table)?
            };
            tx.commit().map_err(|e| self.fail(e))?;
            Ok(out)
        })
    }

    /// The live receipt of `key`; an expired one is as none (the purge deletes it later).
    pub fn get(&self, key: &str, now_ms: u64) -> Result<Option<Receipt>, FenceError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.fail(e))?;
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
        })
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
