//! The durable store: uploaded files (metadata and contents), fine-tuning jobs, their events and
//! their leases. Embedded SQLite (`tandem.db` in the data dir, or in memory) for one server;
//! PostgreSQL (`--database-url`) for replicas that act as one server. Both hold the same tables
//! and answer the same calls; every write is one statement or one transaction.
//!
//! Leases: in a shared store a job is trained by the replica that holds its lease
//! (`lease_owner`, until `lease_until`, in the database's clock). Writes of a leased job go
//! through `heartbeat`/`release`, which succeed only for the holder, so a replica that lost its
//! lease can never overwrite the job's record. Control from another replica (cancel, pause,
//! resume) is left in `wanted` for the holder to apply.

mod postgres;
mod sqlite;

use serde::Serialize;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    #[error("store (PostgreSQL): {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("store (PostgreSQL): {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("store: {0}")]
    Config(String),
}

impl StoreError {
    /// The disk (or the database's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Io(e) => e.kind() == std::io::ErrorKind::StorageFull,
            StoreError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL)
            }
            _ => false,
        }
    }

    /// The database cannot be reached now (down, restarting, the pool cannot connect): the
    /// request may be retried.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_some_and(|c| {
                        c.code().starts_with("08") // connection exception
                            || c.code().starts_with("57P") // admin shutdown, cannot connect now
                    })
                    || std::error::Error::source(e)
                        .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
            }
            _ => false,
        }
    }
}

/// OpenAI's file object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
    /// The tenant that uploaded it (not part of OpenAI's object).
    #[serde(skip)]
    pub owner: String,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Job statuses a replica may claim (with no live lease on them). A paused job is handed back
/// to the store and waits there, holding no replica's slot, until it is resumed (`running`).
pub const CLAIMABLE: [&str; 3] = ["validating_files", "queued", "running"];

/// What the lease holder learns at a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub enum Heartbeat {
    /// Still ours; a control another replica asked for, if any (`cancel`, `pause`, `resume`).
    Held(Option<String>),
    /// Another replica holds it now (or it is gone): stop training it.
    Lost,
}

/// Who holds a job's lease, if anyone does now.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub owner: String,
    pub live: bool,
}

/// An adapter loaded at run time (`POST /v1/load_lora_adapter`), as every replica sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRecord {
    pub path: String,
    /// The tenant that loaded it; None: shared.
    pub owner: Option<String>,
    /// Bumped by every load under the name: a replica serving an older version reloads.
    pub version: i64,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Pg),
}

pub struct Store {
    b: Backend,
}

fn job_key(job: &Value) -> (&str, i64, &str) {
    (
        job["id"].as_str().unwrap_or_default(),
        job["created_at"].as_i64().unwrap_or(0),
        job["status"].as_str().unwrap_or_default(),
    )
}

macro_rules! both {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.b {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e.await,
        }
    };
}

impl Store {
    /// Opens (creating if needed) `dir/tandem.db`, or an in-memory store.
    pub fn open(dir: Option<&Path>) -> Result<Self, StoreError> {
        Ok(Self {
            b: Backend::Sqlite(sqlite::Sqlite::open(dir)?),
        })
    }

    /// Connects to PostgreSQL at `url` (`postgres://user:pass@host:port/db`) with a pool, and
    /// brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            b: Backend::Postgres(postgres::Pg::connect(url).await?),
        })
    }

    /// True for a store other processes share (PostgreSQL): jobs go by leases.
    pub fn is_shared(&self) -> bool {
        matches!(self.b, Backend::Postgres(_))
    }

    pub async fn add_file(
        &self,
        owner: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
    ) -> Result<FileObject, StoreError> {
        let f = FileObject {
            id: format!("file-{}", uuid::Uuid::new_v4().simple()),
            object: "file",
            bytes: content.len() as u64,
            created_at: now(),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            status: "processed",
            owner: owner.to_string(),
        };
        both!(self, b => b.add_file(&f, content))?;
        Ok(f)
    }

    /// Newest first, optionally of one purpose.
    pub async fn files(&self, purpose: Option<&str>) -> Result<Vec<FileObject>, StoreError> {
        both!(self, b => b.files(purpose))
    }

    pub async fn file(&self, id: &str) -> Result<Option<FileObject>, StoreError> {
        both!(self, b => b.file(id))
    }

    pub async fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        both!(self, b => b.file_content(id))
    }

    /// True if it was there.
    pub async fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        both!(self, b => b.delete_file(id))
    }

    /// Creates or replaces a fine-tuning job object (OpenAI's JSON shape, kept whole), whoever
    /// holds its lease: for a new job, and for a server that is the store's only user.
    pub async fn put_job(&self, job: &Value) -> Result<(), StoreError> {
        let (id, created, status) = job_key(job);
        both!(self, b => b.put_job(id, created, status, &job.to_string()))
    }

    /// Replaces job `job` only if no replica holds a live lease on it (a queued or orphaned
    /// job changed by whoever is asked); false if one does.
    pub async fn put_job_unleased(&self, job: &Value) -> Result<bool, StoreError> {
        let (id, _, status) = job_key(job);
        both!(self, b => b.put_job_unleased(id, status, &job.to_string()))
    }

    pub async fn job(&self, id: &str) -> Result<Option<Value>, StoreError> {
        let text = both!(self, b => b.job(id))?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Newest first.
    pub async fn jobs(&self) -> Result<Vec<Value>, StoreError> {
        let texts = both!(self, b => b.jobs())?;
        Ok(texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }

    pub async fn add_event(&self, job_id: &str, event: &Value) -> Result<(), StoreError> {
        both!(self, b => b.add_event(job_id, &event.to_string()))
    }

    /// Newest first.
    pub async fn events(&self, job_id: &str) -> Result<Vec<Value>, StoreError> {
        let texts = both!(self, b => b.events(job_id))?;
        Ok(texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }

    /// Takes the lease of the oldest job that needs a trainer (claimable status, no live
    /// lease) for `ttl`, if one was created at least `min_age` ago; its object.
    pub async fn claim(
        &self,
        me: &str,
        ttl: Duration,
        min_age: Duration,
    ) -> Result<Option<Value>, StoreError> {
        let (ttl, age) = (ttl.as_millis() as i64, min_age.as_secs() as i64);
        let text = both!(self, b => b.claim(me, ttl, age))?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// The holder writes its job and extends its lease by `ttl`.
    pub async fn heartbeat(
        &self,
        me: &str,
        job: &Value,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError> {
        let (id, _, status) = job_key(job);
        let ttl = ttl.as_millis() as i64;
        both!(self, b => b.heartbeat(me, id, status, &job.to_string(), ttl))
    }

    /// The holder writes its job and gives the lease up (the job ended, was paused, or this
    /// replica stops): `Held` with the control left for the holder until then (cleared), or
    /// `Lost` if it no longer held it.
    pub async fn release(&self, me: &str, job: &Value) -> Result<Heartbeat, StoreError> {
        let (id, _, status) = job_key(job);
        both!(self, b => b.release(me, id, status, &job.to_string()))
    }

    /// Leaves `action` for the lease holder of job `id`.
    pub async fn want(&self, id: &str, action: &str) -> Result<(), StoreError> {
        both!(self, b => b.want(id, action))
    }

    /// The holder has applied `action`.
    pub async fn done_wanted(&self, id: &str, action: &str) -> Result<(), StoreError> {
        both!(self, b => b.done_wanted(id, action))
    }

    /// Records adapter `name` at `path` (replacing one of that name); its new version.
    pub async fn put_adapter(
        &self,
        name: &str,
        path: &str,
        owner: Option<&str>,
    ) -> Result<i64, StoreError> {
        both!(self, b => b.put_adapter(name, path, owner))
    }

    /// True if it was recorded.
    pub async fn remove_adapter(&self, name: &str) -> Result<bool, StoreError> {
        both!(self, b => b.remove_adapter(name))
    }

    pub async fn adapter(&self, name: &str) -> Result<Option<AdapterRecord>, StoreError> {
        both!(self, b => b.adapter(name))
    }

    pub async fn adapters(&self) -> Result<Vec<(String, AdapterRecord)>, StoreError> {
        both!(self, b => b.adapters())
    }

    /// Who holds job `id`'s lease.
    pub async fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        both!(self, b => b.lease(id))
    }
}
