//! One entry point for loading a model: an HF directory or a GGUF file, or the default model.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::llama::Llama;
use crate::safetensors_dir::load_safetensors_dir;
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    /// Where it came from.
    pub path: PathBuf,
    /// The name clients use for it (directory or file stem).
    pub name: String,
}

/// The dtype the engine uses on `device`: f32 on CPU, bf16 on CUDA.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Loads `path` (an HF directory or a .gguf file), or the default model when `path` is None.
pub fn load_model(path: Option<&Path>, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let (path, name) = match path {
        Some(p) => (p.to_path_buf(), model_name(p)),
        None => (
            crate::default_model::ensure_default_model()?,
            crate::default_model::MODEL_NAME.to_string(),
        ),
    };
    if !path.exists() {
        return Err(ModelError::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let (cfg, map, src) = load_checkpoint(&path, device, dtype)?;
    let tokenizer = if path.is_dir() {
        TextTokenizer::from_hf_dir(&path, &cfg.eos_token_ids)?
    } else {
        TextTokenizer::from_gguf(&GgufFile::open(&path)?)?
    };
    let model = Llama::from_tensors(cfg, map, &src, device, dtype)?;
    if tokenizer.vocab_size() > model.cfg.vocab_size {
        tracing::warn!(
            tokenizer = tokenizer.vocab_size(),
            model = model.cfg.vocab_size,
            "the tokenizer knows more tokens than the model's embedding has rows"
        );
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        path,
        name,
    })
}

fn model_name(p: &Path) -> String {
    let stem = if p.is_dir() {
        p.file_name()
    } else {
        p.file_stem()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The config and HF-named weights of a checkpoint (HF directory or GGUF file), without the
/// tokenizer; the returned path names the weights file in later errors.
pub fn load_checkpoint(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(ModelConfig, HashMap<String, Tensor>, PathBuf)> {
    if path.is_dir() {
        load_hf_checkpoint(path, device, dtype)
    } else {
        let mut g = GgufFile::open(path)?;
        let cfg = g.config()?;
        let map = g.load_tensors(&cfg, dtype, device)?;
        Ok((cfg, map, path.to_path_buf()))
    }
}

fn load_hf_checkpoint(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(ModelConfig, HashMap<String, Tensor>, PathBuf)> {
    let cfg_path = dir.join("config.json");
    let mut cfg = ModelConfig::from_hf_json(&cfg_path)?;
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        // generation_config.json's eos_token_id (often a list of end-of-turn ids) adds to config.json's.
        let text = std::fs::read_to_string(&gen_path).map_err(|e| ModelError::io(&gen_path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
                path: gen_path.clone(),
                format: "JSON",
                msg: e.to_string(),
            })?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => cfg
                .eos_token_ids
                .extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
            Some(x) => cfg.eos_token_ids.extend(x.as_u64().map(|x| x as u32)),
            None => {}
        }
    }
    let tensors = load_safetensors_dir(dir, dtype, device)?;
    let index = dir.join("model.safetensors.index.json");
    let src = if index.exists() {
        index
    } else {
        dir.join("model.safetensors")
    };
    let map = tensors.into_iter().map(|(k, (t, _))| (k, t)).collect();
    Ok((cfg, map, src))
}
