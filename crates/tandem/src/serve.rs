//! `tandem serve`: loads the model, starts the engine thread, serves the API until Ctrl-C or
//! SIGTERM, then stops accepting connections and lets open responses finish.

use crate::cli::ServeArgs;
use crate::generate::{engine, load};
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use tandem_api::AppState;
use tandem_model::lora::RegistryConfig;
use tandem_scheduler::EngineHandle;

pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_num_seqs == 0 || args.max_batched_tokens == 0 || args.kv_cache_blocks == 0 {
        bail!("--max-num-seqs, --max-batched-tokens and --kv-cache-blocks must be at least 1");
    }
    let m = load(&args.model)?;
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| m.name.clone());
    let tokenizer = m.tokenizer.clone();
    let max_model_len = m.model.cfg.max_position_embeddings;
    let vocab_size = m.model.cfg.vocab_size;
    let lora = RegistryConfig {
        max_loras: args.max_loras.max(1),
        max_lora_rank: args.max_lora_rank,
    };
    let mut e = engine(
        m,
        args.kv_cache_blocks,
        args.max_num_seqs,
        args.max_batched_tokens,
        lora,
    )?;
    e.scheduler.cfg.enable_prefix_caching = !args.no_enable_prefix_caching;
    e.coserve = tandem_scheduler::CoserveConfig {
        mode: args
            .coserve_mode
            .parse()
            .map_err(|m: String| anyhow::anyhow!("--coserve-mode: {m}"))?,
        tpot_slo: slo_ms("--tpot-slo-ms", args.tpot_slo_ms)?,
        ttft_slo: slo_ms("--ttft-slo-ms", args.ttft_slo_ms)?,
        ..Default::default()
    };
    for spec in &args.adapters {
        let (n, p) = spec
            .split_once('=')
            .with_context(|| format!("--adapter {spec}: expected NAME=PATH"))?;
        if n.is_empty() || n == name {
            bail!("--adapter {spec}: `{n}` cannot name an adapter");
        }
        e.runner
            .adapters
            .register(n, p.as_ref())
            .with_context(|| format!("--adapter {spec}"))?;
    }
    let tenants = tandem_api::tenants::Tenants::new(args.api_key.clone(), args.api_keys.clone())
        .context("--api-keys")?;
    let lora_root = match (&args.lora_root, args.allow_runtime_lora) {
        (Some(root), true) => Some(
            std::fs::canonicalize(root)
                .with_context(|| format!("--lora-root {}", root.display()))?,
        ),
        (Some(_), false) => bail!("--lora-root goes with --allow-runtime-lora"),
        _ => None,
    };
    // Replicas sharing a store record adapters loaded at run time in it instead.
    let local_record = args
        .data_dir
        .as_ref()
        .filter(|_| args.database_url.is_none());
    let adapter_store = match local_record {
        Some(dir) => {
            let store = tandem_api::persist::AdapterStore::open(dir)
                .with_context(|| format!("--data-dir {}", dir.display()))?;
            for r in store
                .list()
                .with_context(|| format!("--data-dir {}", dir.display()))?
            {
                let (n, p) = (r.name, r.path);
                if e.runner.adapters.id(&n).is_some() {
                    continue; // given again with --adapter
                }
                if let Some(o) = &r.owner {
                    tenants.set_owner(&n, o);
                }
                match e.runner.adapters.register(&n, &p) {
                    Ok(_) => tracing::info!(adapter = %n, path = %p.display(), "restored adapter"),
                    Err(err) => {
                        tracing::warn!(adapter = %n, error = %err, "cannot restore a recorded adapter; it stays recorded");
                        eprintln!("tandem: warning: cannot restore adapter {n}: {err}");
                    }
                }
            }
            Some(store)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (store, cluster) = open_store(&rt, &args)?;
    let (adapter_dir, adapter_remote) = shared_adapter_store(&rt, &args)?;
    let metrics = tandem_api::metrics::Metrics::new(&name, e.coserve.ttft_slo, e.coserve.tpot_slo)
        .context("cannot set up metrics")?;
    e.on_iteration = Some(metrics.iteration_observer());
    let handle = EngineHandle::spawn(e).context("cannot start the engine thread")?;
    let grammars = Arc::new(tandem_model::grammar::GrammarCompiler::new(
        tokenizer.clone(),
        vocab_size,
    ));
    let state = Arc::new(AppState {
        engine: handle,
        grammars,
        tokenizer,
        model_name: name.clone(),
        max_model_len,
        vocab_size,
        tenants,
        lora_root,
        metrics,
        max_pending: args.max_pending.max(1),
        pending: Default::default(),
        adapter_store,
        store,
        data_dir: args.data_dir.clone(),
        adapter_dir,
        adapter_remote,
        cluster,
    });
    rt.block_on(async move {
        // Jobs from before a restart: finished adapters served again, running ones continued.
        tandem_api::recover_jobs(state.clone()).await;
        // Replicas sharing a store: jobs are claimed from it.
        tokio::spawn(tandem_api::cluster::claim_loop(state.clone()));
        reload_keys_on_sighup(state.clone());
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, model = %name, "serving");
        eprintln!("tandem: serving {name} on http://{local}");
        let drain = state.clone();
        axum::serve(listener, tandem_api::app(state))
            .with_graceful_shutdown(async move {
                shutdown().await;
                // Training stops and every job checkpoints at its last optimizer step (bounded),
                // then open responses are let finish.
                tandem_api::checkpoint_on_shutdown(drain, SHUTDOWN_CHECKPOINT_TIMEOUT).await;
            })
            .await?;
        Ok(())
    })
}

/// The store: PostgreSQL with --database-url (and this replica's part in sharing it), else
/// SQLite in --data-dir (or in memory).
fn open_store(
    rt: &tokio::runtime::Runtime,
    args: &ServeArgs,
) -> Result<(
    tandem_api::store::Store,
    Option<tandem_api::cluster::Cluster>,
)> {
    let Some(url) = &args.database_url else {
        if args.adapter_store.is_some() {
            bail!("--adapter-store goes with --database-url (replicas that share a store)");
        }
        let store =
            tandem_api::store::Store::open(args.data_dir.as_deref()).with_context(|| {
                format!(
                    "cannot open the store in --data-dir {}",
                    args.data_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new("(memory)"))
                        .display()
                )
            })?;
        return Ok((store, None));
    };
    if args.adapter_store.is_none() {
        bail!("--database-url needs --adapter-store DIR or s3://bucket/prefix: a folder or bucket every replica shares, where jobs' checkpoints and adapters go");
    }
    if !(args.lease_seconds.is_finite() && args.lease_seconds >= 1.0) {
        bail!("--lease-seconds must be at least 1");
    }
    let store = rt
        .block_on(tandem_api::store::Store::connect(url))
        .context("--database-url: cannot open the store")?;
    let replica = match &args.replica_id {
        Some(r) if !r.is_empty() => r.clone(),
        _ => format!("{}-{}", host_name(), std::process::id()),
    };
    tracing::info!(%replica, "sharing the store with other replicas");
    let lease = std::time::Duration::from_secs_f64(args.lease_seconds);
    let cluster = tandem_api::cluster::Cluster::new(replica, lease, args.max_jobs);
    Ok((store, Some(cluster)))
}

/// `--adapter-store`: the folder jobs write adapters to (a shared one, or this replica's copy
/// of a bucket's), and the bucket, if it is one.
fn shared_adapter_store(
    rt: &tokio::runtime::Runtime,
    args: &ServeArgs,
) -> Result<(
    Option<std::path::PathBuf>,
    Option<tandem_api::adapter_files::Remote>,
)> {
    let Some(spec) = &args.adapter_store else {
        return Ok((None, None));
    };
    let (dir, remote) = if spec.contains("://") {
        let remote = tandem_api::adapter_files::Remote::from_url(spec)
            .with_context(|| format!("--adapter-store {spec}"))?;
        rt.block_on(remote.check())
            .with_context(|| format!("--adapter-store {spec}: the bucket does not answer"))?;
        // This replica's copies: in its data dir, else a folder of its own.
        let replica = args
            .replica_id
            .clone()
            .unwrap_or_else(|| std::process::id().to_string());
        let dir = match &args.data_dir {
            Some(d) => d.join("adapter-cache"),
            None => std::env::temp_dir()
                .join("tandem-adapter-cache")
                .join(replica),
        };
        (dir, Some(remote))
    } else {
        (std::path::PathBuf::from(spec), None)
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("--adapter-store {spec}: cannot create {}", dir.display()))?;
    Ok((Some(dir), remote))
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tandem".into())
}

/// SIGHUP reads the --api-keys file again; a bad file keeps the keys in force.
fn reload_keys_on_sighup(state: Arc<AppState>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; --api-keys is read at start only");
            return;
        };
        while hup.recv().await.is_some() {
            match state.tenants.reload() {
                Ok(n) => tracing::info!(keys = n, "API keys reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload the API keys; the old ones stay")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = state;
}

/// How long a shutdown waits for the jobs' checkpoints.
const SHUTDOWN_CHECKPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("tandem: shutting down");
}

fn slo_ms(flag: &str, ms: f64) -> Result<std::time::Duration> {
    if ms > 0.0 && ms.is_finite() && ms < 1e9 {
        Ok(std::time::Duration::from_secs_f64(ms / 1e3))
    } else {
        bail!("{flag} must be a positive number of milliseconds, got {ms}")
    }
}
