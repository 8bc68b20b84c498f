//! Replicas as one server: with a shared store (`--database-url`) and a shared adapter store
//! (`--adapter-store`), every replica answers every call alike. A created job waits `queued` in
//! the store; a replica with room claims it (an idle one at once, a busy one only when nobody
//! idle has for a while), trains it under a lease that its watcher renews at every write, and
//! gives it up when the job ends or the replica stops. A replica that dies stops renewing; once
//! the lease lapses another claims the job and resumes it from its newest checkpoint in the
//! adapter store. A replica that lost a lease (the store unreachable, or it was too slow) stops
//! training at its next write, which the store refuses. Cancel, pause and resume from any
//! replica reach the holder through the store. Adapters are shared by `shared_adapters.rs`.
//!
//! Without a shared store every call here is the single server's plain behaviour.

use crate::error::ApiError;
use crate::job_events::event;
use crate::store::{now, Heartbeat, StoreError};
use crate::AppState;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often an idle replica looks for jobs to claim.
const POLL: Duration = Duration::from_secs(1);

/// This replica's part in a shared store.
pub struct Cluster {
    /// Its name in leases and metrics (`--replica-id`).
    pub replica: String,
    /// A lease lapses this long after its holder's last write (`--lease-seconds`).
    pub lease: Duration,
    /// Jobs trained here at once at most (`--max-jobs`).
    pub max_jobs: usize,
    wake: tokio::sync::Notify,
    /// The jobs this replica holds now.
    here: Mutex<BTreeSet<String>>,
    /// Inference tokens the engine had run at the last look (busy: it ran some since).
    inference_seen: std::sync::atomic::AtomicU64,
    /// Adapters loaded at run time that this replica serves from the shared registry, and the
    /// version it loaded.
    pub(crate) loaded: Mutex<std::collections::HashMap<String, i64>>,
}

impl Cluster {
    pub fn new(replica: String, lease: Duration, max_jobs: usize) -> Self {
        Self {
            replica,
            lease,
            max_jobs: max_jobs.max(1),
            wake: Default::default(),
            here: Default::default(),
            inference_seen: Default::default(),
            loaded: Default::default(),
        }
    }

    fn here(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.here.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A lease holder's write, as it went.
#[derive(Debug, PartialEq)]
pub(crate) enum Held {
    /// Written; a control another replica asked for, if any.
    Yes(Option<String>),
    /// Another replica holds the job now: this one must stop training it.
    Lost,
}

/// Keeps a held job from training past its lease: when the store has refused the holder's
/// writes for half a lease (it cannot be reached), training pauses here, and it goes on once a
/// write succeeds (the lease still ours); if another replica took the job meanwhile, the write
/// says so and this one stops.
pub(crate) struct Keeper {
    last_ok: std::time::Instant,
    held_off: bool,
}

impl Keeper {
    pub(crate) fn new() -> Self {
        Self {
            last_ok: std::time::Instant::now(),
            held_off: false,
        }
    }

    /// The status to record: a job paused here for the store is still running to the others.
    pub(crate) fn status<'a>(&self, status: &'a str) -> &'a str {
        if self.held_off {
            "running"
        } else {
            status
        }
    }

    pub(crate) async fn written(&mut self, st: &AppState, id: &str, adapter: &str) {
        self.last_ok = std::time::Instant::now();
        if std::mem::take(&mut self.held_off) {
            tracing::info!(job = %id, "the store answers again; training goes on");
            let _ = st
                .engine
                .control_job(adapter.to_string(), Some(false))
                .await;
        }
    }

    pub(crate) async fn failed(&mut self, st: &AppState, id: &str, adapter: &str, running: bool) {
        let Some(c) = &st.cluster else { return };
        if !self.held_off && running && self.last_ok.elapsed() > c.lease / 2 {
            tracing::warn!(job = %id, "the store cannot be reached; training pauses until it can");
            if st
                .engine
                .control_job(adapter.to_string(), Some(true))
                .await
                .is_ok()
            {
                self.held_off = true;
            }
        }
    }
}

/// Writes a running job's record: plainly for a server alone, as the lease holder's heartbeat
/// in a shared store (recording the replica that trains it).
pub(crate) async fn write_job(st: &AppState, job: &Value) -> Result<Held, StoreError> {
    let Some(c) = &st.cluster else {
        st.store.put_job(job).await?;
        return Ok(Held::Yes(None));
    };
    let mut job = job.clone();
    job["tandem_replica"] = json!(c.replica);
    Ok(match st.store.heartbeat(&c.replica, &job, c.lease).await? {
        Heartbeat::Held(w) => Held::Yes(w),
        Heartbeat::Lost => Held::Lost,
    })
}

/// Writes a job's last record (it ended, or could not start) and gives its lease up.
pub(crate) async fn write_final(st: &AppState, job: &Value) -> Result<(), StoreError> {
    let Some(c) = &st.cluster else {
        return st.store.put_job(job).await;
    };
    if st.store.release(&c.replica, job).await? == Heartbeat::Lost {
        tracing::warn!(job = %job["id"], "the job's end is not recorded: another replica holds it now");
    }
    Ok(())
}

/// Marks job `id` as trained here (or no longer), for `tandem:finetune_job_replica`.
pub(crate) fn trained_here(st: &AppState, id: &str, on: bool) {
    if let Some(c) = &st.cluster {
        if on {
            c.here().insert(id.to_string());
        } else {
            c.here().remove(id);
        }
        st.metrics.job_replica(id, &c.replica, on);
    }
}

/// A control's engine call: pause (Some(true)), resume (Some(false)) or cancel (None).
fn pause_of(action: &str) -> Option<bool> {
    match action {
        "pause" => Some(true),
        "resume" => Some(false),
        _ => None,
    }
}

/// Applies `action`, left for this replica just as it gave job `job` up, to the record.
async fn control_unleased(st: &AppState, job: Value, action: &str) {
    let id = job["id"].as_str().unwrap_or_default().to_string();
    if let Err(e) = control(st, job, pause_of(action)).await {
        tracing::warn!(job = %id, action, error = %e.body.error.message, "cannot apply a job control");
    }
}

/// The holder applies a control another replica left for it. True when the job is to be
/// handed back to the store (paused in a shared store: `hand_off` once its last checkpoint is
/// recorded).
pub(crate) async fn apply_wanted(st: &AppState, id: &str, adapter: &str, action: &str) -> bool {
    let pause = pause_of(action);
    let msg = match pause {
        Some(true) => Some("The job was paused"),
        Some(false) => Some("The job was resumed"),
        // A cancelled job's watcher records the end (and says so) at its next pass.
        None => None,
    };
    let hand_off = pause == Some(true) && st.cluster.is_some();
    match st.engine.control_job(adapter.to_string(), pause).await {
        Ok(()) if hand_off => {
            // Paused here, it waits in the store instead, holding no slot: its last step is
            // checkpointed first, so that whoever resumes it loses nothing.
            if let Err(e) = st.engine.checkpoint_job(adapter.to_string()).await {
                tracing::warn!(job = %id, error = %e, "cannot checkpoint a paused job");
            }
        }
        Ok(()) => {
            if let Some(msg) = msg {
                event(st, id, "info", msg, None).await;
            }
        }
        Err(e) => tracing::warn!(job = %id, action, error = %e, "cannot apply a job control"),
    }
    if let Err(e) = st.store.done_wanted(id, action).await {
        tracing::warn!(job = %id, error = %e, "cannot clear an applied job control");
    }
    hand_off
}

/// Hands paused job `id` (its last checkpoint recorded in `job`) back to the store: the record
/// says `paused` with no lease, and the engine here forgets it. A control left meanwhile (a
/// resume, a cancel) is applied to the record. True when done (or the job is someone else's);
/// false to try again at the next pass.
pub(crate) async fn hand_off(st: &AppState, id: &str, adapter: &str, mut job: Value) -> bool {
    let Some(c) = &st.cluster else { return true };
    job["status"] = json!("paused");
    job["estimated_finish"] = Value::Null;
    match st.store.release(&c.replica, &job).await {
        Ok(Heartbeat::Lost) => {
            lost(st, id, adapter).await;
            true
        }
        Ok(Heartbeat::Held(wanted)) => {
            event(st, id, "info", "The job was paused", None).await;
            tracing::info!(job = %id, "paused job handed back to the store");
            forget(st, id, adapter).await;
            if let Some(action) = wanted.filter(|a| a != "pause") {
                control_unleased(st, job, &action).await;
            }
            true
        }
        Err(e) => {
            tracing::warn!(job = %id, error = %e, "cannot hand a paused job back to the store; retrying");
            false
        }
    }
}

/// The engine here stops and forgets job `id` (it goes on elsewhere, or later); retried while
/// requests still use its adapter.
async fn forget(st: &AppState, id: &str, adapter: &str) {
    for _ in 0..120 {
        match st.engine.release_job(adapter.to_string()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::debug!(job = %id, error = %e, "the job's adapter is in use; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    trained_here(st, id, false);
}

/// This replica lost job `id`'s lease: it stops training it and stops serving its adapter.
pub(crate) async fn lost(st: &AppState, id: &str, adapter: &str) {
    tracing::warn!(job = %id, "another replica holds the job now; training stops here");
    forget(st, id, adapter).await;
}

/// Cancel, pause or resume a job in a shared store: a job nobody trains now (queued, or its
/// trainer gone) is changed here; a trained one is changed by its holder, asked through the
/// store. The job object as it will be.
pub(crate) async fn control(
    st: &AppState,
    mut job: Value,
    pause: Option<bool>,
) -> Result<Value, ApiError> {
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let status = job["status"].as_str().unwrap_or_default().to_string();
    if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
        return Err(ApiError::invalid(
            format!("Cannot change job {id}: it has already {status}"),
            None,
        ));
    }
    let (action, new_status, msg) = match pause {
        None => ("cancel", "cancelled", "The job was cancelled"),
        Some(true) => ("pause", "paused", "The job was paused"),
        Some(false) => ("resume", "running", "The job was resumed"),
    };
    job["status"] = json!(new_status);
    if pause.is_none() {
        job["finished_at"] = json!(now());
    }
    if st.store.put_job_unleased(&job).await? {
        event(st, &id, "info", msg, None).await;
        return Ok(job);
    }
    st.store.want(&id, action).await?;
    // Its holder may have given the job up just now without seeing the control: then it is
    // applied here.
    if st.store.put_job_unleased(&job).await? {
        st.store.done_wanted(&id, action).await?;
        event(st, &id, "info", msg, None).await;
        return Ok(job);
    }
    tracing::info!(job = %id, action, "job control left for the replica that trains it");
    Ok(job)
}

/// Room for one more job here: None if this replica trains as many as it may; otherwise the
/// age a job must have before this replica takes it (none when idle; busy replicas leave new
/// jobs to idle ones for a few lease periods).
async fn room(st: &AppState, c: &Cluster) -> Option<Duration> {
    if c.here().len() >= c.max_jobs {
        return None;
    }
    let stats = st.engine.stats().await.ok()?;
    let ran = stats.counters.decode_tokens + stats.counters.prefill_tokens;
    let before = c
        .inference_seen
        .swap(ran, std::sync::atomic::Ordering::Relaxed);
    Some(if stats.running + stats.waiting == 0 && ran == before {
        Duration::ZERO
    } else {
        c.lease * 3
    })
}

/// Asks the claim loop to look now (a job was created here).
pub(crate) fn wake(st: &AppState) {
    if let Some(c) = &st.cluster {
        c.wake.notify_one();
    }
}

/// The replica's claim loop: runs for the server's life.
pub async fn claim_loop(st: Arc<AppState>) {
    let Some(c) = &st.cluster else { return };
    let why = format!("on replica {}", c.replica);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = c.wake.notified() => {},
            _ = tokio::time::sleep(POLL) => {},
        }
        let Some(min_age) = room(&st, c).await else {
            continue;
        };
        match st.store.claim(&c.replica, c.lease, min_age).await {
            Ok(Some(job)) => {
                failing = false;
                let id = job["id"].as_str().unwrap_or_default().to_string();
                tracing::info!(job = %id, replica = %c.replica, "job claimed");
                trained_here(&st, &id, true);
                if !crate::job_life::start_record(&st, job, &why).await {
                    trained_here(&st, &id, false);
                }
                // There may be more: look again at once.
                c.wake.notify_one();
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot claim jobs from the store; retrying");
                }
                failing = true;
            }
        }
    }
}

/// At shutdown: every job held here is given up, so that another replica claims it at once.
pub async fn release_all(st: &AppState) {
    let Some(c) = &st.cluster else { return };
    let ids: Vec<String> = c.here().iter().cloned().collect();
    for id in ids {
        match st.store.job(&id).await {
            Ok(Some(job)) => match st.store.release(&c.replica, &job).await {
                Ok(Heartbeat::Held(Some(action))) => {
                    tracing::info!(job = %id, "job released at shutdown");
                    control_unleased(st, job, &action).await;
                }
                Ok(_) => tracing::info!(job = %id, "job released at shutdown"),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "cannot release the job; its lease lapses")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot release the job; its lease lapses")
            }
        }
        trained_here(st, &id, false);
    }
}
