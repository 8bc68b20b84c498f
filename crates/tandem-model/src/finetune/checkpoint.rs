//! A training run's checkpoints: the PEFT adapter, the AdamW moments
//! (`optimizer.safetensors`) and `trainer_state.json` (step, config), written to a temporary
//! folder, synced and renamed into place; and the run continued from one.

use super::{TrainConfig, TrainData, TrainableLora, TrainingRun};
use crate::error::{ModelError, Result};
use crate::ModelConfig;
use candle_core::{DType, Device};
use std::path::Path;

impl TrainingRun {
    /// Writes a checkpoint: the adapter (PEFT), the AdamW state (`optimizer.safetensors`) and
    /// `trainer_state.json` (step, config), so that `resume` continues exactly. Written to a
    /// temporary folder and renamed into place.
    pub fn save_checkpoint(&self, dir: &Path, base_model: Option<String>) -> Result<()> {
        let tmp = dir.with_extension("tmp");
        let r = self.write_checkpoint(&tmp, dir, base_model);
        if r.is_err() {
            // A write that failed (a full disk) leaves nothing behind to take space.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }

    fn write_checkpoint(&self, tmp: &Path, dir: &Path, base_model: Option<String>) -> Result<()> {
        let _ = std::fs::remove_dir_all(tmp);
        std::fs::create_dir_all(tmp).map_err(|e| ModelError::io(tmp, e))?;
        self.lora.to_adapter(base_model.clone())?.save(tmp)?;
        let state = self.opt.state_tensors();
        candle_core::safetensors::save(&state, tmp.join("optimizer.safetensors"))?;
        let meta = serde_json::json!({
            "step": self.step,
            "total_steps": self.total_steps(),
            "config": self.cfg,
            "base_model": base_model,
        });
        let meta_path = tmp.join("trainer_state.json");
        std::fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&meta).unwrap_or_default(),
        )
        .map_err(|e| ModelError::io(&meta_path, e))?;
        // On disk before the rename makes it the checkpoint (a crash then leaves the old one or
        // the new one whole; a torn one is skipped at resume).
        let sync = |p: &Path| {
            std::fs::File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|e| ModelError::io(p, e))
        };
        for entry in std::fs::read_dir(tmp).map_err(|e| ModelError::io(tmp, e))? {
            sync(&entry.map_err(|e| ModelError::io(tmp, e))?.path())?;
        }
        sync(tmp)?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(tmp, dir).map_err(|e| ModelError::io(dir, e))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync(parent)?;
        }
        Ok(())
    }

    /// The run checkpointed in `dir`, to continue on the same `data`; with the base model name
    /// it recorded.
    pub fn resume(
        dir: &Path,
        data: impl Into<TrainData>,
        model: &ModelConfig,
        device: &Device,
    ) -> Result<(Self, Option<String>)> {
        let meta_path = dir.join("trainer_state.json");
        let text =
            std::fs::read_to_string(&meta_path).map_err(|e| ModelError::io(&meta_path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
                path: meta_path.clone(),
                format: "JSON",
                msg: e.to_string(),
            })?;
        let cfg: TrainConfig = serde_json::from_value(meta["config"].clone())
            .map_err(|e| ModelError::field(&meta_path, "config", e.to_string()))?;
        let step = meta["step"]
            .as_u64()
            .ok_or_else(|| ModelError::field(&meta_path, "step", "missing"))?
            as usize;
        let base_model = meta["base_model"].as_str().map(String::from);
        let adapter = crate::lora::LoraAdapter::load(dir, model, device, DType::F32)?;
        let lora = TrainableLora::from_adapter(&adapter, model.num_hidden_layers, device)?;
        let mut run = TrainingRun::new(data, cfg, lora)?;
        let opt_path = dir.join("optimizer.safetensors");
        let state = candle_core::safetensors::load(&opt_path, device).map_err(|e| {
            ModelError::field(&opt_path, "tensors", crate::error::candle_message(&e))
        })?;
        run.opt.restore(step, state)?;
        run.step = step;
        Ok((run, base_model))
    }
}
