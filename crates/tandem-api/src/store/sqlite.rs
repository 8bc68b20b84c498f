//! The embedded store: SQLite, `tandem.db` in the data dir (WAL, synchronous writes), or in
//! memory without one. One connection behind a mutex: one server is its only user.

use super::{AdapterRecord, FileObject, Heartbeat, Lease, StoreError, CLAIMABLE};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

pub(super) struct Sqlite {
    conn: Mutex<Connection>,
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
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    owner TEXT,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    object TEXT NOT NULL
);
";

/// Columns added after a table's first version: (table, column, its definition). Stores made
/// before them get them with their defaults (files before tenants belong to the default one).
const ADDED: [(&str, &str, &str); 5] = [
    ("files", "owner", "TEXT NOT NULL DEFAULT 'default'"),
    ("jobs", "status", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "lease_owner", "TEXT"),
    ("jobs", "lease_until", "INTEGER"),
    ("jobs", "wanted", "TEXT"),
];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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

impl Sqlite {
    pub(super) fn open(dir: Option<&Path>) -> Result<Self, StoreError> {
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
        for (table, column, def) in ADDED {
            let has = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
                ))?
                .exists([])?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
                if (table, column) == ("jobs", "status") {
                    conn.execute_batch(
                        "UPDATE jobs SET status = coalesce(json_extract(object, '$.status'), '')",
                    )?;
                }
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions), so go on.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn add_file(&self, f: &FileObject, content: &[u8]) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, content, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![f.id, f.filename, f.purpose, f.bytes as i64, f.created_at, content, f.owner],
        )?;
        Ok(())
    }

    pub(super) fn files(&self, purpose: Option<&str>) -> Result<Vec<FileObject>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT id, filename, purpose, bytes, created_at, owner FROM files
             WHERE ?1 IS NULL OR purpose = ?1 ORDER BY created_at DESC, rowid DESC",
        )?;
        let rows = st.query_map(params![purpose], row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn file(&self, id: &str) -> Result<Option<FileObject>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, filename, purpose, bytes, created_at, owner FROM files WHERE id = ?1",
                params![id],
                row,
            )
            .optional()?)
    }

    pub(super) fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT content FROM files WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub(super) fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM files WHERE id = ?1", params![id])?
            > 0)
    }

    pub(super) fn put_job(
        &self,
        id: &str,
        created: i64,
        status: &str,
        object: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO jobs (id, created_at, object, status) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET object = excluded.object, status = excluded.status",
            params![id, created, object, status],
        )?;
        Ok(())
    }

    pub(super) fn put_job_unleased(
        &self,
        id: &str,
        status: &str,
        object: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE jobs SET object = ?2, status = ?3 WHERE id = ?1
             AND (lease_owner IS NULL OR lease_until < ?4)",
            params![id, object, status, now_ms()],
        )? > 0)
    }

    pub(super) fn job(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT object FROM jobs WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub(super) fn jobs(&self) -> Result<Vec<String>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT object FROM jobs ORDER BY created_at DESC, rowid DESC")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn add_event(&self, job_id: &str, event: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO events (job_id, object) VALUES (?1, ?2)",
            params![job_id, event],
        )?;
        Ok(())
    }

    pub(super) fn events(&self, job_id: &str) -> Result<Vec<String>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT object FROM events WHERE job_id = ?1 ORDER BY seq DESC")?;
        let rows = st.query_map(params![job_id], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn claim(
        &self,
        me: &str,
        ttl_ms: i64,
        min_age_s: i64,
    ) -> Result<Option<String>, StoreError> {
        let now = now_ms();
        let c = self.conn();
        let statuses = CLAIMABLE.map(|s| format!("'{s}'")).join(", ");
        Ok(c.query_row(
            &format!(
                "UPDATE jobs SET lease_owner = ?1, lease_until = ?2 WHERE id = (
                   SELECT id FROM jobs WHERE status IN ({statuses})
                   AND (lease_owner IS NULL OR lease_until < ?3) AND created_at <= ?4
                   ORDER BY created_at, id LIMIT 1)
                 RETURNING object"
            ),
            params![me, now + ttl_ms, now, now / 1000 - min_age_s],
            |r| r.get(0),
        )
        .optional()?)
    }

    pub(super) fn heartbeat(
        &self,
        me: &str,
        id: &str,
        status: &str,
        object: &str,
        ttl_ms: i64,
    ) -> Result<Heartbeat, StoreError> {
        let wanted: Option<Option<String>> = self
            .conn()
            .query_row(
                "UPDATE jobs SET object = ?3, status = ?4, lease_until = ?5
                 WHERE id = ?1 AND lease_owner = ?2 RETURNING wanted",
                params![id, me, object, status, now_ms() + ttl_ms],
                |r| r.get(0),
            )
            .optional()?;
        Ok(wanted.map_or(Heartbeat::Lost, Heartbeat::Held))
    }

    pub(super) fn release(
        &self,
        me: &str,
        id: &str,
        status: &str,
        object: &str,
    ) -> Result<Heartbeat, StoreError> {
        // One connection behind the lock: nothing writes between the two statements.
        let c = self.conn();
        let wanted: Option<Option<String>> = c
            .query_row(
                "SELECT wanted FROM jobs WHERE id = ?1 AND lease_owner = ?2",
                params![id, me],
                |r| r.get(0),
            )
            .optional()?;
        let Some(wanted) = wanted else {
            return Ok(Heartbeat::Lost);
        };
        c.execute(
            "UPDATE jobs SET object = ?3, status = ?4, lease_owner = NULL, lease_until = NULL,
             wanted = NULL WHERE id = ?1 AND lease_owner = ?2",
            params![id, me, object, status],
        )?;
        Ok(Heartbeat::Held(wanted))
    }

    pub(super) fn want(&self, id: &str, action: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET wanted = ?2 WHERE id = ?1",
            params![id, action],
        )?;
        Ok(())
    }

    pub(super) fn done_wanted(&self, id: &str, action: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET wanted = NULL WHERE id = ?1 AND wanted = ?2",
            params![id, action],
        )?;
        Ok(())
    }

    pub(super) fn put_adapter(
        &self,
        name: &str,
        path: &str,
        owner: Option<&str>,
    ) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "INSERT INTO adapters (name, path, owner, version) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT(name) DO UPDATE SET path = excluded.path, owner = excluded.owner,
             version = adapters.version + 1 RETURNING version",
            params![name, path, owner],
            |r| r.get(0),
        )?)
    }

    pub(super) fn remove_adapter(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM adapters WHERE name = ?1", params![name])?
            > 0)
    }

    pub(super) fn adapter(&self, name: &str) -> Result<Option<AdapterRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT path, owner, version FROM adapters WHERE name = ?1",
                params![name],
                |r| {
                    Ok(AdapterRecord {
                        path: r.get(0)?,
                        owner: r.get(1)?,
                        version: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    pub(super) fn adapters(&self) -> Result<Vec<(String, AdapterRecord)>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT name, path, owner, version FROM adapters ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get(0)?,
                AdapterRecord {
                    path: r.get(1)?,
                    owner: r.get(2)?,
                    version: r.get(3)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let now = now_ms();
        let got: Option<(Option<String>, Option<i64>)> = self
            .conn()
            .query_row(
                "SELECT lease_owner, lease_until FROM jobs WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match got {
            Some((Some(owner), until)) => Some(Lease {
                owner,
                live: until.is_some_and(|u| u >= now),
            }),
            _ => None,
        })
    }
}
