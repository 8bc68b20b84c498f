//! Adapters every replica sharing a store serves alike: those jobs made (finished models and
//! checkpoints, in the adapter store) and those loaded at run time (`POST /v1/load_lora_adapter`,
//! recorded in the store's adapter registry with a version). A replica loads one the first time
//! a request names it, reloads it when another replica loaded new weights under the name, and
//! drops it once it was unloaded elsewhere.

use crate::error::ApiError;
use crate::jobs::{checkpoint_dir, fine_tuned_dir};
use crate::tenants::job_owner;
use crate::AppState;
use std::path::PathBuf;

/// The adapters jobs in the store made: (model name, the folder it is in, its owner), each
/// finished job's model and every checkpoint still on disk.
async fn stored_adapters(st: &AppState) -> Result<Vec<(String, PathBuf, String)>, ApiError> {
    let mut out = Vec::new();
    for job in st.store.jobs().await? {
        let id = job["id"].as_str().unwrap_or_default();
        let owner = job_owner(&job).to_string();
        if let (Some(name), Some(dir)) = (job["fine_tuned_model"].as_str(), fine_tuned_dir(st, id))
        {
            out.push((name.to_string(), dir, owner.clone()));
        }
        for c in job["tandem_checkpoints"].as_array().into_iter().flatten() {
            if let (Some(name), Some(step)) = (
                c["fine_tuned_model_checkpoint"].as_str(),
                c["step_number"].as_u64(),
            ) {
                let dir = checkpoint_dir(st, id).join(format!("step-{step}"));
                out.push((name.to_string(), dir, owner.clone()));
            }
        }
    }
    // An object store's adapters are fetched when they are used: the record says they exist.
    if st.adapter_remote.is_none() {
        out.retain(|(_, dir, _)| dir.exists());
    }
    Ok(out)
}

/// For the model list: the adapters the shared store knows that this replica does not serve
/// yet, with their owners (None: shared), and those it serves that were unloaded elsewhere.
pub(crate) async fn unloaded_adapters(
    st: &AppState,
    served: &[String],
) -> Result<(Vec<(String, Option<String>)>, Vec<String>), ApiError> {
    let Some(c) = &st.cluster else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut more: Vec<(String, Option<String>)> = stored_adapters(st)
        .await?
        .into_iter()
        .map(|(n, _, o)| (n, Some(o)))
        .collect();
    let registry = st.store.adapters().await?;
    more.extend(registry.iter().map(|(n, r)| (n.clone(), r.owner.clone())));
    more.retain(|(n, _)| !served.contains(n));
    more.dedup();
    let gone = c
        .loaded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .filter(|n| !registry.iter().any(|(r, _)| r == *n))
        .cloned()
        .collect();
    Ok((more, gone))
}

/// Records adapter `name`, just loaded here from `path` at run time, in the shared registry
/// (a no-op alone: the data dir's `adapters.json` records it).
pub(crate) async fn record_loaded(
    st: &AppState,
    name: &str,
    path: &std::path::Path,
    owner: Option<&str>,
) -> Result<(), ApiError> {
    let Some(c) = &st.cluster else { return Ok(()) };
    let path = path.to_string_lossy();
    let version = st.store.put_adapter(name, &path, owner).await?;
    c.loaded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), version);
    Ok(())
}

/// Takes adapter `name`, just unloaded here, out of the shared registry.
pub(crate) async fn record_unloaded(st: &AppState, name: &str) -> Result<(), ApiError> {
    let Some(c) = &st.cluster else { return Ok(()) };
    st.store.remove_adapter(name).await?;
    c.loaded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(name);
    Ok(())
}

/// In a shared store, makes sure this replica serves `model` as the store has it: an adapter
/// loaded at run time on any replica (reloaded if its version moved on, dropped if it was
/// unloaded), or one a job made (loaded from the adapter store). Anything else is left to the
/// caller.
pub(crate) async fn ensure_served(st: &AppState, model: &str) -> Result<(), ApiError> {
    let Some(c) = &st.cluster else { return Ok(()) };
    if model == st.model_name {
        return Ok(());
    }
    let served = |s: &tandem_scheduler::EngineStats| s.adapters.iter().any(|a| a == model);
    let here = served(&st.engine.stats().await.map_err(ApiError::internal)?);
    let have = c
        .loaded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(model)
        .copied();
    match st.store.adapter(model).await? {
        Some(rec) if here && have == Some(rec.version) => return Ok(()),
        Some(rec) => {
            if here {
                let _ = st.engine.unload_adapter(model.to_string()).await;
            }
            match &rec.owner {
                Some(o) => st.tenants.set_owner(model, o),
                None => st.tenants.forget(model),
            }
            load(st, model, &PathBuf::from(&rec.path)).await?;
            c.loaded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(model.to_string(), rec.version);
            return Ok(());
        }
        None if have.is_some() => {
            // Unloaded on another replica: gone here too.
            c.loaded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(model);
            let _ = st.engine.unload_adapter(model.to_string()).await;
            st.tenants.forget(model);
            return Ok(());
        }
        None => {}
    }
    if here {
        return Ok(());
    }
    let Some((name, dir, owner)) = stored_adapters(st)
        .await?
        .into_iter()
        .find(|(n, _, _)| n == model)
    else {
        return Ok(());
    };
    if !crate::adapter_files::present(st, &dir).await {
        return Err(ApiError::adapter_store_unavailable(format!(
            "{name} is recorded but cannot be fetched from the adapter store"
        )));
    }
    st.tenants.set_owner(&name, &owner);
    load(st, &name, &dir).await
}

/// Loads adapter `name` from `dir` (a request beside this one may have loaded it first).
async fn load(st: &AppState, name: &str, dir: &std::path::Path) -> Result<(), ApiError> {
    if let Err(e) = st
        .engine
        .load_adapter(name.to_string(), dir.to_path_buf())
        .await
    {
        let stats = st.engine.stats().await.map_err(ApiError::internal)?;
        if !stats.adapters.iter().any(|a| a == name) {
            return Err(ApiError::internal(format!(
                "cannot load {name} from {}: {e}",
                dir.display()
            )));
        }
    }
    tracing::info!(adapter = %name, path = %dir.display(), "adapter loaded from the shared store");
    Ok(())
}
