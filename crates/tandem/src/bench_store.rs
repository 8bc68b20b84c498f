//! `tandem bench store`: what the store costs a fine-tuning job, per watcher pass, on SQLite
//! (the embedded default, in a temporary data dir) and on PostgreSQL (`--database-url`), in one
//! run. A pass is what a job's watcher does every 250 ms: read the job, write it back (for a
//! shared store, the lease's heartbeat); a pass after an optimizer step also records the step's
//! metrics event.

use crate::cli::BenchStoreArgs;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tandem_api::store::{now, Heartbeat, Store};

/// A job object as the watcher writes it: OpenAI's fields, tandem's, and ten checkpoints.
fn job_object(id: &str) -> Value {
    let ckpts: Vec<Value> = (1..=10)
        .map(|s| {
            json!({"id": format!("ftckpt-{s}"), "object": "fine_tuning.job.checkpoint",
            "created_at": now(), "fine_tuned_model_checkpoint": format!("ft:m:tandem:abc:ckpt-step-{s}"),
            "fine_tuning_job_id": id, "step_number": s,
            "metrics": {"step": s, "train_loss": 1.25, "train_mean_token_accuracy": 0.5,
                "valid_loss": null, "valid_mean_token_accuracy": null}})
        })
        .collect();
    json!({"id": id, "object": "fine_tuning.job", "created_at": now(), "status": "running",
        "model": "SmolLM2-135M-Instruct", "fine_tuned_model": null, "training_file": "file-x",
        "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
        "trained_tokens": 12345, "tandem_checkpoints": ckpts, "tandem_adapter": "ft:m:tandem:abc"})
}

fn step_event(step: usize) -> Value {
    json!({"id": format!("ftevent-{step}"), "object": "fine_tuning.job.event", "created_at": now(),
        "level": "info", "message": format!("Step {step}/100: training loss=1.2345"), "type": "metrics",
        "data": {"step": step, "total_steps": 100, "train_loss": 1.2345,
            "train_mean_token_accuracy": 0.5, "learning_rate": 1e-4, "trained_tokens": 100}})
}

struct Timing {
    pass: Vec<Duration>,
    step: Vec<Duration>,
}

async fn run_one(store: &Store, passes: usize) -> Result<Timing> {
    let id = format!("ftjob-bench-{}", std::process::id());
    let mut job = job_object(&id);
    store.put_job(&job).await?;
    let me = "bench";
    let lease = Duration::from_secs(60);
    if store.is_shared() && store.claim(me, lease, Duration::ZERO).await?.is_none() {
        bail!("cannot claim the benchmark's job (another queued job in this database is older)");
    }
    let write = |job: Value| async move {
        if store.is_shared() {
            if store.heartbeat(me, &job, lease).await? == Heartbeat::Lost {
                bail!("the benchmark lost its lease");
            }
        } else {
            store.put_job(&job).await?;
        }
        Ok(())
    };
    let mut t = Timing {
        pass: Vec::new(),
        step: Vec::new(),
    };
    for i in 0..passes {
        let t0 = Instant::now();
        let read = store.job(&id).await?.context("the job is gone")?;
        job["trained_tokens"] = json!(read["trained_tokens"].as_u64().unwrap_or(0) + 1);
        write(job.clone()).await?;
        t.pass.push(t0.elapsed());
        let t0 = Instant::now();
        store.job(&id).await?;
        store.add_event(&id, &step_event(i + 1)).await?;
        write(job.clone()).await?;
        t.step.push(t0.elapsed());
    }
    job["status"] = json!("succeeded");
    if store.is_shared() {
        store.release(me, &job).await?;
    } else {
        store.put_job(&job).await?;
    }
    Ok(t)
}

fn summary(d: &mut [Duration]) -> (f64, f64, f64) {
    d.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = d.iter().map(|d| ms(*d)).sum::<f64>() / d.len().max(1) as f64;
    let pick = |q: f64| ms(d[((d.len() - 1) as f64 * q).round() as usize]);
    (mean, pick(0.5), pick(0.99))
}

pub fn run(args: BenchStoreArgs) -> Result<()> {
    if args.passes == 0 {
        bail!("--passes must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile_dir()?;
    let mut rows = Vec::new();
    let sqlite = Store::open(Some(&dir)).context("SQLite store")?;
    rows.push(("sqlite", rt.block_on(run_one(&sqlite, args.passes))?));
    if let Some(url) = &args.database_url {
        let pg = rt.block_on(Store::connect(url)).context("--database-url")?;
        rows.push(("postgres", rt.block_on(run_one(&pg, args.passes))?));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "store cost per watcher pass, {} passes each (ms: mean / p50 / p99)",
        args.passes
    );
    let mut base = None;
    for (name, mut t) in rows {
        let (pm, p50, p99) = summary(&mut t.pass);
        let (sm, s50, s99) = summary(&mut t.step);
        let ratio = base.map_or(String::new(), |b: f64| {
            format!("  ({:.2}x SQLite per step)", sm / b)
        });
        base.get_or_insert(sm);
        println!(
            "{name:9} pass {pm:.3} / {p50:.3} / {p99:.3}   pass with a step {sm:.3} / {s50:.3} / {s99:.3}{ratio}"
        );
    }
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("tandem-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
