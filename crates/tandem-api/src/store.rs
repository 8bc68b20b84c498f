//! The durable store: uploaded files (metadata and contents), fine-tuning jobs and their events
//! in SQLite — `tandem.db` in the data
//! dir, or in memory without one. Every write is one transaction, so a crash leaves a file
//! either fully there or not at all.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// The disk (or the database's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Io(e) => e.kind() == std::io::ErrorKind::StorageFull,
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

pub struct Store {
    conn: Mutex<Connection>,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    object TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    object TEXT NOT NULL
);
";

impl Store {
    /// Opens (creating if needed) `dir/tandem.db`, or an in-memory store.
    pub fn open(dir: Option<&Path>) -> Result<Self, StoreError> {
        let conn = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                let c = Connection::open(d.join("tandem.db"))?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", "FULL")?;
                c
            }
            None => Connection::open_in_memory()?,
        };
        conn.execute_batch(SCHEMA)?;
        // Stores made before tenants: their files belong to the default tenant.
        let has_owner = conn
            .prepare("SELECT 1 FROM pragma_table_info('files') WHERE name = 'owner'")?
            .exists([])?;
        if !has_owner {
            conn.execute_batch(
                "ALTER TABLE files ADD COLUMN owner TEXT NOT NULL DEFAULT 'default'",
            )?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions), so go on.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_file(
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
        self.conn().execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, content, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![f.id, f.filename, f.purpose, f.bytes as i64, f.created_at, content, f.owner],
        )?;
        Ok(f)
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileObject> {
        Ok(FileObject {
            id: r.get(0)?,
            object: "file",
            filename: r.get(1)?,
            purpose: r.get(2)?,
            bytes: r.get::<_, i64>(3)? as u64,
            created_at: r.get(4)?,
            status: "processed",
            owner: r.get(5)?,
        })
    }

    /// Newest first, optionally of one purpose.
    pub fn files(&self, purpose: Option<&str>) -> Result<Vec<FileObject>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT id, filename, purpose, bytes, created_at, owner FROM files
             WHERE ?1 IS NULL OR purpose = ?1 ORDER BY created_at DESC, rowid DESC",
        )?;
        let rows = st.query_map(params![purpose], Self::row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn file(&self, id: &str) -> Result<Option<FileObject>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, filename, purpose, bytes, created_at, owner FROM files WHERE id = ?1",
                params![id],
                Self::row,
            )
            .optional()?)
    }

    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT content FROM files WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Creates or replaces a fine-tuning job object (OpenAI's JSON shape, kept whole).
    pub fn put_job(&self, job: &serde_json::Value) -> Result<(), StoreError> {
        let id = job["id"].as_str().unwrap_or_default();
        let created = job["created_at"].as_i64().unwrap_or(0);
        self.conn().execute(
            "INSERT INTO jobs (id, created_at, object) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET object = excluded.object",
            params![id, created, job.to_string()],
        )?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let text: Option<String> = self
            .conn()
            .query_row("SELECT object FROM jobs WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Newest first.
    pub fn jobs(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT object FROM jobs ORDER BY created_at DESC, rowid DESC")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows
            .filter_map(|r| r.ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect())
    }

    pub fn add_event(&self, job_id: &str, event: &serde_json::Value) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO events (job_id, object) VALUES (?1, ?2)",
            params![job_id, event.to_string()],
        )?;
        Ok(())
    }

    /// Newest first.
    pub fn events(&self, job_id: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT object FROM events WHERE job_id = ?1 ORDER BY seq DESC")?;
        let rows = st.query_map(params![job_id], |r| r.get::<_, String>(0))?;
        Ok(rows
            .filter_map(|r| r.ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect())
    }

    /// True if it was there.
    pub fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM files WHERE id = ?1", params![id])?
            > 0)
    }
}
