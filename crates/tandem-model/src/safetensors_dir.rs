//! Loading an HF model directory's weights: `model.safetensors`, or the shards named by
//! `model.safetensors.index.json`.

use crate::error::{candle_message, ModelError, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Every tensor of the directory's checkpoint, converted to `dtype` on `device`, keyed by its
/// HF name, each with the file it came from (for error messages).
pub fn load_safetensors_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, (Tensor, PathBuf)>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        shard_files(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    } else if single.exists() {
        vec![single]
    } else {
        return Err(ModelError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json in the model directory",
            ),
        ));
    };
    let mut out = HashMap::new();
    for file in files {
        for (name, t) in load_safetensors_file(&file, dtype, device)? {
            out.insert(name, (t, file.clone()));
        }
    }
    Ok(out)
}

fn shard_files(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
        path: index.into(),
        format: "JSON",
        msg: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::field(index, "weight_map", "missing or not an object"))?;
    map.iter()
        .map(|(k, f)| {
            f.as_str().map(str::to_string).ok_or_else(|| {
                ModelError::field(index, format!("weight_map.{k}"), "not a file name")
            })
        })
        .collect()
}

/// All tensors of one safetensors file, as floats of `dtype` on `device`.
pub fn load_safetensors_file(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    // SAFETY: the file is mapped read-only; tandem does not write model files while they are mapped,
    // and the tensors are copied out (converted and moved to `device`) before the map is dropped.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Corrupt {
        path: path.into(),
        format: "safetensors",
        msg: candle_message(&e),
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let dt = view.dtype();
        use safetensors::Dtype as S;
        if !matches!(dt, S::F32 | S::F16 | S::BF16 | S::F64) {
            return Err(ModelError::Dtype {
                path: path.into(),
                tensor: name,
                dtype: format!("{dt:?}"),
            });
        }
        let t = st
            .load(&name, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(device))
            .map_err(|e| ModelError::Tensor {
                path: path.into(),
                tensor: name.clone(),
                msg: candle_message(&e),
            })?;
        out.push((name, t));
    }
    Ok(out)
}
