//! The shared store: PostgreSQL through tokio-postgres with a deadpool pool, for replicas that
//! act as one server. Migrations are numbered SQL applied in order under an advisory lock (so
//! replicas starting together apply each once); two tables' worth of schema does not need a
//! migration framework. Lease times are the database's clock, never a replica's.

use super::{AdapterRecord, FileObject, Heartbeat, Lease, StoreError, CLAIMABLE};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

pub(super) struct Pg {
    pool: Pool,
}

/// Every schema change, in order; `tandem_schema` records how many were applied.
const MIGRATIONS: [&str; 2] = [
    "
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    seq BIGSERIAL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    owner TEXT NOT NULL,
    content BYTEA NOT NULL
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    seq BIGSERIAL,
    created_at BIGINT NOT NULL,
    object TEXT NOT NULL,
    status TEXT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT,
    wanted TEXT
);
CREATE INDEX jobs_claim ON jobs (status, created_at);
CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    object TEXT NOT NULL
);
CREATE INDEX events_job ON events (job_id, seq);
",
    "
CREATE TABLE adapters (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    owner TEXT,
    version BIGINT NOT NULL
);
",
];

/// The database's clock in milliseconds.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

fn file_row(r: &tokio_postgres::Row) -> FileObject {
    FileObject {
        id: r.get(0),
        object: "file",
        filename: r.get(1),
        purpose: r.get(2),
        bytes: r.get::<_, i64>(3) as u64,
        created_at: r.get(4),
        status: "processed",
        owner: r.get(5),
    }
}

impl Pg {
    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        Ok(self.pool.get().await?.execute(sql, params).await?)
    }

    async fn opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.pool.get().await?.query_opt(sql, params).await?)
    }

    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        Ok(self.pool.get().await?.query(sql, params).await?)
    }

    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("--database-url: {e}")))?;
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(5)))
            .wait_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Config(format!("--database-url: {e}")))?;
        let pg = Self { pool };
        pg.migrate().await?;
        Ok(pg)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7261001)", &[])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS tandem_schema (version INTEGER NOT NULL)")
            .await?;
        let applied: i64 = tx
            .query_one("SELECT count(*) FROM tandem_schema", &[])
            .await?
            .get(0);
        for (i, m) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            tx.batch_execute(m).await?;
            tx.execute(
                "INSERT INTO tandem_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .await?;
            tracing::info!(version = i + 1, "store schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn add_file(&self, f: &FileObject, content: &[u8]) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, owner, content)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &f.id,
                &f.filename,
                &f.purpose,
                &(f.bytes as i64),
                &f.created_at,
                &f.owner,
                &content,
            ],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn files(&self, purpose: Option<&str>) -> Result<Vec<FileObject>, StoreError> {
        let rows = self
            .rows(
                "SELECT id, filename, purpose, bytes, created_at, owner FROM files
                 WHERE $1::TEXT IS NULL OR purpose = $1 ORDER BY created_at DESC, seq DESC",
                &[&purpose],
            )
            .await?;
        Ok(rows.iter().map(file_row).collect())
    }

    pub(super) async fn file(&self, id: &str) -> Result<Option<FileObject>, StoreError> {
        let row = self
            .opt(
                "SELECT id, filename, purpose, bytes, created_at, owner FROM files WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(file_row))
    }

    pub(super) async fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self
            .opt("SELECT content FROM files WHERE id = $1", &[&id])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.exec("DELETE FROM files WHERE id = $1", &[&id]).await?;
        Ok(n > 0)
    }

    pub(super) async fn put_job(
        &self,
        id: &str,
        created: i64,
        status: &str,
        object: &str,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO jobs (id, created_at, object, status) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET object = excluded.object, status = excluded.status",
            &[&id, &created, &object, &status],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn put_job_unleased(
        &self,
        id: &str,
        status: &str,
        object: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .exec(
                &format!(
                    "UPDATE jobs SET object = $2, status = $3 WHERE id = $1
                     AND (lease_owner IS NULL OR lease_until < {NOW_MS})"
                ),
                &[&id, &object, &status],
            )
            .await?;
        Ok(n > 0)
    }

    pub(super) async fn job(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .opt("SELECT object FROM jobs WHERE id = $1", &[&id])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn jobs(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .rows(
                "SELECT object FROM jobs ORDER BY created_at DESC, seq DESC",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(super) async fn add_event(&self, job_id: &str, event: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO events (job_id, object) VALUES ($1, $2)",
            &[&job_id, &event],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn events(&self, job_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .rows(
                "SELECT object FROM events WHERE job_id = $1 ORDER BY seq DESC",
                &[&job_id],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(super) async fn claim(
        &self,
        me: &str,
        ttl_ms: i64,
        min_age_s: i64,
    ) -> Result<Option<String>, StoreError> {
        let statuses = CLAIMABLE.map(|s| format!("'{s}'")).join(", ");
        // SKIP LOCKED: replicas claiming at once each get a different job, or none.
        let row = self
            .opt(
                &format!(
                    "UPDATE jobs SET lease_owner = $1, lease_until = {NOW_MS} + $2 WHERE id = (
                       SELECT id FROM jobs WHERE status IN ({statuses})
                       AND (lease_owner IS NULL OR lease_until < {NOW_MS})
                       AND created_at <= {NOW_MS} / 1000 - $3
                       ORDER BY created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING object"
                ),
                &[&me, &ttl_ms, &min_age_s],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn heartbeat(
        &self,
        me: &str,
        id: &str,
        status: &str,
        object: &str,
        ttl_ms: i64,
    ) -> Result<Heartbeat, StoreError> {
        let row = self
            .opt(
                &format!(
                    "UPDATE jobs SET object = $3, status = $4, lease_until = {NOW_MS} + $5
                     WHERE id = $1 AND lease_owner = $2 RETURNING wanted"
                ),
                &[&id, &me, &object, &status, &ttl_ms],
            )
            .await?;
        Ok(row.map_or(Heartbeat::Lost, |r| Heartbeat::Held(r.get(0))))
    }

    pub(super) async fn release(
        &self,
        me: &str,
        id: &str,
        status: &str,
        object: &str,
    ) -> Result<Heartbeat, StoreError> {
        // The control left until now comes back with the release (the row locked between).
        let row = self
            .opt(
                "UPDATE jobs SET object = $3, status = $4, lease_owner = NULL, lease_until = NULL,
                   wanted = NULL
                 FROM (SELECT wanted AS w FROM jobs WHERE id = $1 AND lease_owner = $2
                       FOR UPDATE) old
                 WHERE id = $1 AND lease_owner = $2 RETURNING old.w",
                &[&id, &me, &object, &status],
            )
            .await?;
        Ok(row.map_or(Heartbeat::Lost, |r| Heartbeat::Held(r.get(0))))
    }

    pub(super) async fn want(&self, id: &str, action: &str) -> Result<(), StoreError> {
        self.exec("UPDATE jobs SET wanted = $2 WHERE id = $1", &[&id, &action])
            .await?;
        Ok(())
    }

    pub(super) async fn done_wanted(&self, id: &str, action: &str) -> Result<(), StoreError> {
        self.exec(
            "UPDATE jobs SET wanted = NULL WHERE id = $1 AND wanted = $2",
            &[&id, &action],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn put_adapter(
        &self,
        name: &str,
        path: &str,
        owner: Option<&str>,
    ) -> Result<i64, StoreError> {
        let row = self
            .pool
            .get()
            .await?
            .query_one(
                "INSERT INTO adapters (name, path, owner, version) VALUES ($1, $2, $3, 1)
                 ON CONFLICT (name) DO UPDATE SET path = excluded.path, owner = excluded.owner,
                 version = adapters.version + 1 RETURNING version",
                &[&name, &path, &owner],
            )
            .await?;
        Ok(row.get(0))
    }

    pub(super) async fn remove_adapter(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .exec("DELETE FROM adapters WHERE name = $1", &[&name])
            .await?;
        Ok(n > 0)
    }

    pub(super) async fn adapter(&self, name: &str) -> Result<Option<AdapterRecord>, StoreError> {
        let row = self
            .opt(
                "SELECT path, owner, version FROM adapters WHERE name = $1",
                &[&name],
            )
            .await?;
        Ok(row.map(|r| AdapterRecord {
            path: r.get(0),
            owner: r.get(1),
            version: r.get(2),
        }))
    }

    pub(super) async fn adapters(&self) -> Result<Vec<(String, AdapterRecord)>, StoreError> {
        let rows = self
            .rows(
                "SELECT name, path, owner, version FROM adapters ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    AdapterRecord {
                        path: r.get(1),
                        owner: r.get(2),
                        version: r.get(3),
                    },
                )
            })
            .collect())
    }

    pub(super) async fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let row = self
            .opt(
                &format!(
                    "SELECT lease_owner, lease_until >= {NOW_MS} FROM jobs
                     WHERE id = $1 AND lease_owner IS NOT NULL"
                ),
                &[&id],
            )
            .await?;
        Ok(row.map(|r| Lease {
            owner: r.get(0),
            live: r.get::<_, Option<bool>>(1).unwrap_or(false),
        }))
    }
}
