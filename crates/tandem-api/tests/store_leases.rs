//! The store's two backends answer alike: files, events, and the job leases replicas share
//! (claim, heartbeat, release, control left for the holder, lapse, age), against SQLite and
//! against a real PostgreSQL server this test starts (Debian's `initdb`/`pg_ctl`; skipped with
//! a note where PostgreSQL is not installed). Claims racing on PostgreSQL never hand one job to
//! two replicas.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tandem_api::store::{now, AdapterRecord, Heartbeat, Lease, Store};

const HOUR: Duration = Duration::from_secs(3600);

fn job(id: &str, created_at: i64, status: &str) -> Value {
    json!({"id": id, "created_at": created_at, "status": status, "object": "fine_tuning.job"})
}

fn ids(jobs: &[Value]) -> Vec<&str> {
    jobs.iter().map(|j| j["id"].as_str().unwrap()).collect()
}

async fn claim_id(s: &Store, me: &str, ttl: Duration, age: Duration) -> Option<String> {
    let j = s.claim(me, ttl, age).await.unwrap()?;
    Some(j["id"].as_str().unwrap().to_string())
}

/// The same sequence of calls and answers on either backend.
async fn leases_and_records(s: &Store) {
    let t = now();
    s.put_job(&job("a", t - 20, "queued")).await.unwrap();
    s.put_job(&job("b", t - 10, "running")).await.unwrap();
    s.put_job(&job("done", t - 30, "succeeded")).await.unwrap();
    assert_eq!(ids(&s.jobs().await.unwrap()), ["b", "a", "done"]);

    // Oldest claimable first; a finished job never.
    assert_eq!(
        claim_id(s, "r1", HOUR, Duration::ZERO).await.as_deref(),
        Some("a")
    );
    assert_eq!(
        claim_id(s, "r2", HOUR, Duration::ZERO).await.as_deref(),
        Some("b")
    );
    assert_eq!(claim_id(s, "r3", HOUR, Duration::ZERO).await, None);
    let live = |o: &str| {
        Some(Lease {
            owner: o.into(),
            live: true,
        })
    };
    assert_eq!(s.lease("a").await.unwrap(), live("r1"));

    // Only the holder writes.
    let mut a = job("a", t - 20, "running");
    a["trained_tokens"] = json!(7);
    assert_eq!(
        s.heartbeat("r1", &a, HOUR).await.unwrap(),
        Heartbeat::Held(None)
    );
    assert_eq!(
        s.heartbeat("r2", &job("a", 0, "failed"), HOUR)
            .await
            .unwrap(),
        Heartbeat::Lost
    );
    assert!(!s.put_job_unleased(&job("a", 0, "cancelled")).await.unwrap());
    assert_eq!(s.job("a").await.unwrap().unwrap()["trained_tokens"], 7);

    // A control left for the holder, until it says it applied it.
    s.want("a", "pause").await.unwrap();
    assert_eq!(
        s.heartbeat("r1", &a, HOUR).await.unwrap(),
        Heartbeat::Held(Some("pause".into()))
    );
    s.done_wanted("a", "resume").await.unwrap(); // not the one asked: stays
    assert_eq!(
        s.heartbeat("r1", &a, HOUR).await.unwrap(),
        Heartbeat::Held(Some("pause".into()))
    );
    s.done_wanted("a", "pause").await.unwrap();
    assert_eq!(
        s.heartbeat("r1", &a, HOUR).await.unwrap(),
        Heartbeat::Held(None)
    );

    // Released: no lease, and claimable again (still running).
    assert_eq!(s.release("r1", &a).await.unwrap(), Heartbeat::Held(None));
    assert_eq!(s.release("r1", &a).await.unwrap(), Heartbeat::Lost);
    assert_eq!(s.lease("a").await.unwrap(), None);
    assert_eq!(
        claim_id(s, "r3", HOUR, Duration::ZERO).await.as_deref(),
        Some("a")
    );
    // A control left just before a release comes back with it, and is cleared.
    s.want("a", "resume").await.unwrap();
    let paused = job("a", t - 20, "paused");
    assert_eq!(
        s.release("r3", &paused).await.unwrap(),
        Heartbeat::Held(Some("resume".into()))
    );
    // A paused job nobody holds is nobody's to train: not claimable until resumed.
    assert_eq!(claim_id(s, "r3", HOUR, Duration::ZERO).await, None);
    assert!(s.put_job_unleased(&a).await.unwrap());
    assert_eq!(
        claim_id(s, "r3", HOUR, Duration::ZERO).await.as_deref(),
        Some("a")
    );
    assert_eq!(
        s.heartbeat("r3", &a, HOUR).await.unwrap(),
        Heartbeat::Held(None)
    );

    // A lapsed lease goes to the next claimer; the old holder's writes are refused.
    let mut b = job("b", t - 10, "running");
    assert_eq!(s.release("r2", &b).await.unwrap(), Heartbeat::Held(None));
    let short = Duration::from_millis(1);
    assert_eq!(
        claim_id(s, "r2", short, Duration::ZERO).await.as_deref(),
        Some("b")
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.lease("b").await.unwrap(),
        Some(Lease {
            owner: "r2".into(),
            live: false
        })
    );
    assert!(s.put_job_unleased(&b).await.unwrap());
    assert_eq!(
        claim_id(s, "r1", HOUR, Duration::ZERO).await.as_deref(),
        Some("b")
    );
    b["trained_tokens"] = json!(1);
    assert_eq!(s.heartbeat("r2", &b, HOUR).await.unwrap(), Heartbeat::Lost);

    // Too young for a busy replica, taken by an idle one.
    s.put_job(&job("c", now(), "queued")).await.unwrap();
    assert_eq!(claim_id(s, "r4", short, HOUR).await, None);
    assert_eq!(
        claim_id(s, "r4", HOUR, Duration::ZERO).await.as_deref(),
        Some("c")
    );

    // Files and events.
    let f = s
        .add_file("alice", "t.jsonl", "fine-tune", b"{}\n")
        .await
        .unwrap();
    let g = s.add_file("bob", "u.jsonl", "batch", b"x").await.unwrap();
    assert_eq!(s.file(&f.id).await.unwrap().unwrap(), f);
    assert_eq!(s.file_content(&f.id).await.unwrap().unwrap(), b"{}\n");
    let listed = s.files(Some("fine-tune")).await.unwrap();
    assert_eq!(listed, vec![f.clone()]);
    assert_eq!(s.files(None).await.unwrap().len(), 2);
    assert!(s.delete_file(&g.id).await.unwrap());
    assert!(!s.delete_file(&g.id).await.unwrap());
    assert_eq!(s.file(&g.id).await.unwrap(), None);
    for i in 0..3 {
        s.add_event("a", &json!({"n": i})).await.unwrap();
    }
    s.add_event("b", &json!({"n": 9})).await.unwrap();
    let ns: Vec<i64> = s
        .events("a")
        .await
        .unwrap()
        .iter()
        .map(|e| e["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, [2, 1, 0]);

    // The registry of adapters loaded at run time: a new version at every load of a name.
    assert_eq!(s.put_adapter("x", "/a/x1", Some("alice")).await.unwrap(), 1);
    assert_eq!(s.put_adapter("y", "/a/y", None).await.unwrap(), 1);
    assert_eq!(s.put_adapter("x", "/a/x2", None).await.unwrap(), 2);
    let x = AdapterRecord {
        path: "/a/x2".into(),
        owner: None,
        version: 2,
    };
    assert_eq!(s.adapter("x").await.unwrap(), Some(x.clone()));
    let names: Vec<String> = s
        .adapters()
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["x", "y"]);
    assert!(s.remove_adapter("x").await.unwrap());
    assert!(!s.remove_adapter("x").await.unwrap());
    assert_eq!(s.adapter("x").await.unwrap(), None);
    assert_eq!(s.put_adapter("x", "/a/x3", None).await.unwrap(), 1);
}

#[tokio::test]
async fn sqlite_store_leases_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(Some(dir.path())).unwrap();
    assert!(!s.is_shared());
    leases_and_records(&s).await;
    // Reopened: everything is still there.
    drop(s);
    let s = Store::open(Some(dir.path())).unwrap();
    assert_eq!(s.jobs().await.unwrap().len(), 4);
    assert_eq!(s.lease("c").await.unwrap().unwrap().owner, "r4");
}

/// A PostgreSQL server of its own in a temporary folder; stopped when dropped.
struct Postgres {
    dir: tempfile::TempDir,
    pg_ctl: PathBuf,
    as_user: Vec<String>,
    url: String,
}

fn pg_bin(name: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

impl Postgres {
    fn start() -> Option<Self> {
        let (initdb, pg_ctl) = (pg_bin("initdb")?, pg_bin("pg_ctl")?);
        let dir = tempfile::tempdir().ok()?;
        // initdb and postgres refuse root: run them as Debian's postgres user then.
        let root = Command::new("id").arg("-u").output().ok()?.stdout == b"0\n";
        let as_user: Vec<String> = if root {
            Command::new("chown")
                .args(["postgres"])
                .arg(dir.path())
                .status()
                .ok()?;
            ["runuser", "-u", "postgres", "--"]
                .map(String::from)
                .to_vec()
        } else {
            vec![]
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let run = |prog: &Path, args: &[&str]| {
            let mut cmd = Command::new(as_user.first().map_or(prog.as_os_str(), |u| u.as_ref()));
            cmd.args(as_user.iter().skip(1));
            if !as_user.is_empty() {
                cmd.arg(prog);
            }
            let out = cmd.args(args).output().expect("run a PostgreSQL program");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data = dir.path().join("data");
        let data = data.to_str()?;
        run(&initdb, &["-D", data, "-U", "tandem", "--auth=trust"]);
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.path().display()
        );
        let log = dir.path().join("log");
        run(
            &pg_ctl,
            &["-D", data, "-l", log.to_str()?, "-o", &opts, "-w", "start"],
        );
        Some(Self {
            url: format!("postgres://tandem@127.0.0.1:{port}/postgres"),
            dir,
            pg_ctl,
            as_user,
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut cmd = Command::new(
            self.as_user
                .first()
                .map_or(self.pg_ctl.as_os_str(), |u| u.as_ref()),
        );
        cmd.args(self.as_user.iter().skip(1));
        if !self.as_user.is_empty() {
            cmd.arg(&self.pg_ctl);
        }
        let _ = cmd
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_leases_and_records_and_racing_claims() {
    let Some(pg) = Postgres::start() else {
        eprintln!("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): skipped");
        return;
    };
    let s = Store::connect(&pg.url).await.unwrap();
    assert!(s.is_shared());
    leases_and_records(&s).await;
    // A second replica's pool on the same database: the schema is applied once, data shared.
    let other = Store::connect(&pg.url).await.unwrap();
    assert_eq!(other.jobs().await.unwrap().len(), 4);

    // Eight replicas claim three jobs at once: each job goes to exactly one.
    for i in 0..3 {
        s.put_job(&job(&format!("race{i}"), now() - 100, "queued"))
            .await
            .unwrap();
    }
    let store = std::sync::Arc::new(other);
    let tasks: Vec<_> = (0..8)
        .map(|r| {
            let store = store.clone();
            tokio::spawn(async move {
                let me = format!("racer{r}");
                claim_id(&store, &me, HOUR, Duration::ZERO).await
            })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.unwrap());
    }
    won.sort();
    assert_eq!(won, ["race0", "race1", "race2"]);

    // A bad URL is a clear error, not a hang.
    let bad = Store::connect("postgres://tandem@127.0.0.1:1/postgres").await;
    assert!(bad.is_err_and(|e| e.is_unavailable()));
}
