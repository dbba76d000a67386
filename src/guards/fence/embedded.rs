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

/// Most receipts one purge transaction deletes. A write transaction copies every tree page it changes
/// to a new page, and redb reuses the old ones only after a later commit: purging minutes of expired
/// keys in one transaction rewrote most of the tree at once and grew the file to hold both copies (the
/// soak with a 2-minute ttl: 5.6 -> 30.1 MB at the first purge, then kept). Rounds of a few hundred keys
/// each free pages the next rounds and writes reuse (same soak: steady at 10.7-12.6 MB).
pub(super) const PURGE_BATCH: usize = 256;

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
            if is_expired(bytes, now_ms) {
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

    /// Deletes the receipts expired by `now_ms`, [`PURGE_BATCH`] at most per write transaction.
    pub fn purge(&self, now_ms: u64) -> Result<usize, FenceError> {
        let mut purged = 0;
        let mut from: Option<String> = None;
        loop {
            let batch = self.purge_batch(now_ms, from.as_deref())?;
            purged += batch.removed;
            match batch.next {
                Some(key) => from = Some(key),
                None => return Ok(purged),
            }
        }
    }

    /// One round of the purge: finds up to [`PURGE_BATCH`] expired receipts from the key `from` on
    /// (inclusive; `None` = the first key) in a read transaction, so the scan holds no write lock, then
    /// deletes those still expired in one write transaction (a `put` in between may have renewed a key).
    /// No write transaction when nothing expired: an empty commit would still cost an fsync.
    pub(super) fn purge_batch(
        &self,
        now_ms: u64,
        from: Option<&str>,
    ) -> Result<PurgeBatch, FenceError> {
        let (expired, next) = self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.fail(e))?;
            let table = tx.open_table(RECEIPTS).map_err(|e| self.fail(e))?;
            let range = match from {
                Some(key) => table.range::<&str>(key..),
                None => table.range::<&str>(..),
            }
            .map_err(|e| self.fail(e))?;
            let mut expired = Vec::new();
            for entry in range {
                let (key, value) = entry.map_err(|e| self.fail(e))?;
                if expired.len() == PURGE_BATCH {
                    return Ok((expired, Some(key.value().to_string())));
                }
                if is_expired(value.value(), now_ms) {
                    expired.push(key.value().to_string());
                }
            }
            Ok((expired, None))
        })?;
        if expired.is_empty() {
            return Ok(PurgeBatch { removed: 0, next });
        }
        let removed = self.write(|table| {
            let mut removed = 0;
            for key in &expired {
                let still = table
                    .get(key.as_str())
                    .map_err(|e| self.fail(e))?
                    .is_some_and(|v| is_expired(v.value(), now_ms));
                if still {
                    table.remove(key.as_str()).map_err(|e| self.fail(e))?;
                    removed += 1;
                }
            }
            Ok(removed)
        })?;
        Ok(PurgeBatch { removed, next })
    }
}

/// What one round of the purge did.
#[derive(Debug)]
pub(super) struct PurgeBatch {
    /// Receipts deleted, at most [`PURGE_BATCH`].
    pub removed: usize,
    /// The key the next round starts at; `None` once the scan reached the end of the table.
    pub next: Option<String>,
}

/// An unreadable expiry counts as expired: the receipt cannot be replayed anyway.
fn is_expired(bytes: &[u8], now_ms: u64) -> bool {
    Receipt::expires_of(bytes).is_none_or(|at| at <= now_ms)
}
